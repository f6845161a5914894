"""The project-managed local Kafka broker (``ragstream kafka up|down|status``), for real.

Each broker runs in a throwaway home on a free port; the jars come from the default cache
(``RAGSTREAM_CACHE_DIR``), so Maven fetches them once per machine. Needs ``java`` (17+) and,
for that first fetch, ``mvn``.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from devtools import kafka_local
from streams.errors import RagstreamError
from streams.settings import Settings, get_settings


def _settings(home: Path) -> Settings:
    return get_settings().model_copy(
        update={"home": home, "broker": f"127.0.0.1:{kafka_local.free_port()}"}
    )


def _port_open(bootstrap: str) -> bool:
    host, _, port = bootstrap.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


async def _produce(bootstrap: str, topic: str, value: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=b"k")
    finally:
        await producer.stop()


async def _consume_one(bootstrap: str, topic: str, group: str) -> bytes | None:
    """One message through a classic consumer group (join, fetch, commit)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        msg = await asyncio.wait_for(consumer.getone(), timeout=30)
        await consumer.commit()
        value: bytes | None = msg.value
        return value
    finally:
        await consumer.stop()


@pytest.fixture(scope="module")
def local_broker(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Settings, kafka_local.BrokerInfo]]:
    settings = _settings(tmp_path_factory.mktemp("kafka-home"))
    info = kafka_local.up(settings, wait_s=90)
    try:
        yield settings, info
    finally:
        kafka_local.down(settings)


# --- without a broker ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "port"),
    [
        ("127.0.0.1:9092", 9092),
        ("localhost:19092", 19092),
        ("a:1,b:2", 1),
        ("kafka", 9092),
        ("[::1]:9093", 9093),
    ],
)
def test_broker_port(spec: str, port: int) -> None:
    assert kafka_local.broker_port(Settings(broker=spec)) == port


def test_secure_listeners_join_the_plaintext_one(tmp_path: Path) -> None:
    """The production listeners are added beside PLAINTEXT and CONTROLLER, which ``status``
    and ``up`` still find; SCRAM users are created for both SCRAMs at format time."""
    settings = Settings(home=tmp_path, broker="127.0.0.1:9092")
    secure = kafka_local.SecureListeners(
        sasl_ssl_port=9093,
        ssl_port=9094,
        keystore=tmp_path / "keystore.pem",
        truststore=tmp_path / "ca.pem",
        users={"alice": "pw"},
    )
    text = kafka_local._server_properties(settings, 9092, 9099, secure)
    lines = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    assert lines["listeners"] == (
        "PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9099,"
        "SASL_SSL://127.0.0.1:9093,SSL://127.0.0.1:9094"
    )
    assert lines["listener.security.protocol.map"] == (
        "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,SSL:SSL"
    )
    assert lines["inter.broker.listener.name"] == "PLAINTEXT"
    assert lines["sasl.enabled.mechanisms"] == "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512"
    assert 'user_alice="pw"' in lines["listener.name.sasl_ssl.plain.sasl.jaas.config"]
    assert lines["listener.name.ssl.ssl.client.auth"] == "required"
    assert secure.scram_arguments() == [
        "--add-scram",
        "SCRAM-SHA-256=[name=alice,password=pw]",
        "--add-scram",
        "SCRAM-SHA-512=[name=alice,password=pw]",
    ]
    kafka_local.kafka_dir(settings).mkdir(parents=True)
    kafka_local._config_file(settings).write_text(text)
    assert kafka_local._read_config(settings) == (9092, 9099, settings.kafka_version)


def test_ensure_jars_without_maven_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "mvn" else real(name))
    settings = get_settings().model_copy(update={"cache_dir": tmp_path})
    with pytest.raises(RagstreamError, match="mvn"):
        kafka_local.ensure_jars(settings)


def test_status_of_a_fresh_home_is_none(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    assert kafka_local.status(settings) is None
    assert kafka_local.down(settings) is False


# --- a real broker ---------------------------------------------------------------------------


@pytest.mark.kafka
@pytest.mark.timeout(180)
def test_status_reports_the_running_broker(
    local_broker: tuple[Settings, kafka_local.BrokerInfo],
) -> None:
    settings, info = local_broker
    assert info.bootstrap == f"127.0.0.1:{kafka_local.broker_port(settings)}"
    assert info.version == settings.kafka_version
    assert info.log.is_file()
    assert kafka_local.status(settings) == info
    assert _port_open(info.bootstrap)


@pytest.mark.kafka
@pytest.mark.timeout(180)
def test_produce_and_consume_one_message(
    local_broker: tuple[Settings, kafka_local.BrokerInfo],
) -> None:
    _, info = local_broker
    topic = f"t-{uuid.uuid4().hex[:8]}"  # auto-created on first produce
    value = b"hello from ragstream"
    asyncio.run(_produce(info.bootstrap, topic, value))
    assert asyncio.run(_consume_one(info.bootstrap, topic, f"g-{topic}")) == value


@pytest.mark.kafka
@pytest.mark.timeout(180)
def test_up_again_is_idempotent(local_broker: tuple[Settings, kafka_local.BrokerInfo]) -> None:
    settings, info = local_broker
    t0 = time.monotonic()
    again = kafka_local.up(settings)
    assert again == info
    assert time.monotonic() - t0 < 10
    with pytest.raises(RagstreamError, match="already runs"):
        kafka_local.up(settings, port=kafka_local.free_port())


@pytest.mark.kafka
@pytest.mark.timeout(180)
def test_up_refuses_a_taken_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = _settings(tmp_path).model_copy(update={"broker": f"127.0.0.1:{port}"})
        with pytest.raises(RagstreamError, match="taken"):
            kafka_local.up(settings)
    assert kafka_local.status(settings) is None


@pytest.mark.kafka
@pytest.mark.timeout(240)
def test_down_stops_it_and_a_restart_keeps_the_data(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    info = kafka_local.up(settings, wait_s=90)
    try:
        topic = "kept"
        asyncio.run(_produce(info.bootstrap, topic, b"survives a restart"))

        assert kafka_local.down(settings) is True
        assert kafka_local.status(settings) is None
        assert not _port_open(info.bootstrap)
        assert kafka_local.down(settings) is False  # nothing left to stop

        again = kafka_local.up(settings, wait_s=90)  # formatted storage: no new cluster
        assert again.pid != info.pid
        assert again.bootstrap == info.bootstrap
        assert asyncio.run(_consume_one(again.bootstrap, topic, "g-kept")) == b"survives a restart"
    finally:
        kafka_local.down(settings)
    assert kafka_local.status(settings) is None
    assert not _port_open(info.bootstrap)
