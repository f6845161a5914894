"""Production connections: Kafka over TLS and SASL, Milvus with a login and TLS.

The unit tests (no broker) check what every client is given, and that no client is built
outside the one module that gives it. The ``kafka`` tests start one broker of their own for
the module with a SASL_SSL listener (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512) and an SSL listener
that requires a client certificate, from a CA that the test makes with ``openssl``; the
pipeline runs end to end through SASL_SSL, and a wrong password, a wrong CA or a missing
client certificate is one clear line from the CLI within seconds, not a hang.

A Milvus server with TLS cannot run here (Milvus Lite has neither login nor TLS): its
keyword arguments are checked as pymilvus reads them.
"""

from __future__ import annotations

import ast
import asyncio
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from pydantic import SecretStr

from devtools import kafka_local
from devtools.corpus import CorpusServer, corpus_files, subset
from streams import kafka
from streams.errors import ConfigError, KafkaRefused
from streams.milvus_lite import connect_kwargs
from streams.settings import Settings
from tests.helpers import Worker, baseline, expected_index, milvus_rows, publish_urls, wait_for

ROOT = Path(__file__).resolve().parent.parent
USER, PASSWORD, WRONG = "alice", "alice-s3cret", "not-alices-s3cret"


# --- a CA and certificates, made with openssl ------------------------------------------------


@dataclass(frozen=True)
class Tls:
    ca: Path  # the CA's certificate
    other_ca: Path  # a CA that signed nothing here
    keystore: Path  # the broker's key and certificate (127.0.0.1, localhost)
    client_cert: Path
    client_key: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


def _ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN=ragstream test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip


def _signed(d: Path, name: str, usage: str) -> None:
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
        "-subj", f"/CN={name}",
        cwd=d,
    )  # fmt: skip
    (d / f"{name}.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        f"keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n"
    )
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext",
        cwd=d,
    )  # fmt: skip


def make_tls(d: Path) -> Tls:
    """A test CA, a broker certificate for 127.0.0.1 and a client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d.mkdir(parents=True, exist_ok=True)
    _ca(d, "ca")
    _ca(d, "other")
    _signed(d, "broker", "serverAuth")
    _signed(d, "client", "clientAuth")
    keystore = d / "broker-keystore.pem"  # Kafka's PEM keystore: PKCS#8 key, then certificate
    keystore.write_text((d / "broker.key").read_text() + (d / "broker.pem").read_text())
    return Tls(d / "ca.pem", d / "other.pem", keystore, d / "client.pem", d / "client.key")


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    return make_tls(tmp_path_factory.mktemp("tls"))


def sasl(tls: Tls, broker: str, mechanism: str, **update: object) -> Settings:
    return Settings(
        broker=broker,
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism=mechanism,
        kafka_username=USER,
        kafka_password=PASSWORD,
        kafka_ca_file=str(tls.ca),
        **update,
    )


# --- what every client gets (no broker) ------------------------------------------------------


def test_plaintext_connection_is_the_bootstrap_servers_only() -> None:
    s = Settings(broker="k1:9092,k2:9092")
    assert kafka.connection(s) == {
        "bootstrap_servers": "k1:9092,k2:9092",
        "security_protocol": "PLAINTEXT",
    }
    assert kafka.faust_broker(s) == {"broker": "kafka://k1:9092,k2:9092"}


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_ssl_reaches_aiokafka_and_faust_alike(tls: Tls, mechanism: str) -> None:
    s = sasl(tls, "k:9093", mechanism)
    conn = kafka.connection(s)
    assert conn["security_protocol"] == "SASL_SSL"
    assert (conn["sasl_mechanism"], conn["sasl_plain_username"]) == (mechanism, USER)
    assert conn["sasl_plain_password"] == PASSWORD
    context = conn["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert any("ragstream test ca" in str(c["subject"]) for c in context.get_ca_certs())
    # what Faust hands each aiokafka client it makes, read from Faust's own translation
    faust_conf = kafka.faust_broker(s)
    auth = credentials_to_aiokafka_auth(faust_conf["broker_credentials"])
    assert {k: v for k, v in auth.items() if k != "ssl_context"} == {
        k: v for k, v in conn.items() if k not in ("bootstrap_servers", "ssl_context")
    }
    assert auth["ssl_context"].get_ca_certs() == context.get_ca_certs()


def test_sasl_without_tls_and_tls_with_a_client_certificate(tls: Tls) -> None:
    s = Settings(
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="SCRAM-SHA-256",
        kafka_username=USER,
        kafka_password=PASSWORD,
    )
    assert "ssl_context" not in kafka.connection(s)
    assert credentials_to_aiokafka_auth(kafka.faust_broker(s)["broker_credentials"])[
        "security_protocol"
    ] == ("SASL_PLAINTEXT")
    mtls = Settings(
        kafka_security_protocol="SSL",
        kafka_ca_file=str(tls.ca),
        kafka_cert_file=str(tls.client_cert),
        kafka_key_file=str(tls.client_key),
    )
    conn = kafka.connection(mtls)
    assert conn["security_protocol"] == "SSL" and "sasl_mechanism" not in conn
    auth = credentials_to_aiokafka_auth(kafka.faust_broker(mtls)["broker_credentials"])
    assert auth["security_protocol"] == "SSL"
    # a key that is not the certificate's is a settings error naming the files
    wrong = mtls.model_copy(update={"kafka_key_file": str(tls.keystore.with_name("ca.key"))})
    with pytest.raises(ConfigError, match="RAGSTREAM_KAFKA_KEY_FILE"):
        kafka.connection(wrong)


def test_refusals_name_the_settings_never_the_password(tls: Tls) -> None:
    from aiokafka.errors import SaslAuthenticationFailed

    s = sasl(tls, "k:9093", "SCRAM-SHA-512")
    msg = str(kafka.refused(SaslAuthenticationFailed("invalid credentials"), s))
    assert "authentication failed for user 'alice' with SCRAM-SHA-512" in msg
    assert "RAGSTREAM_KAFKA_PASSWORD" in msg and PASSWORD not in msg
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    verify.verify_message = "unable to get local issuer certificate"
    assert "does not verify" in str(kafka.refused(verify, s))


#: Constructors of clients that must get their connection from one place.
KAFKA_CLIENTS = {"AIOKafkaProducer", "AIOKafkaConsumer", "AIOKafkaAdminClient", "AIOKafkaClient"}
ALLOWED = {"MilvusClient": "streams/store.py", "create_conn": "streams/kafka.py"}


def _calls(path: Path) -> Iterator[tuple[str, ast.Call]]:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name == "App":  # faust.App(...), or App(...) imported from faust
                owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
                name = "faust.App" if owner in ("", "faust") else f"{owner}.App"
            yield name, node


def test_every_client_is_built_where_its_connection_is_given() -> None:
    """A Kafka client built anywhere but streams/kafka.py (a Faust app without
    ``**kafka.faust_broker``, a MilvusClient outside streams/store.py) would connect
    without TLS or credentials in production."""
    stray = []
    for top in ("streams", "agents", "ops", "ragstream", "devtools", "bench"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for name, call in _calls(path):
                home = "streams/kafka.py" if name in KAFKA_CLIENTS else ALLOWED.get(name, rel)
                if rel != home:
                    stray.append(f"{rel}:{call.lineno} {name}")
                elif name == "faust.App" and not any(
                    kw.arg is None and "faust_broker" in ast.unparse(kw.value)
                    for kw in call.keywords
                ):
                    stray.append(f"{rel}:{call.lineno} faust.App without kafka.faust_broker")
    assert stray == []


def test_milvus_login_and_tls_reach_a_server_not_lite(tls: Tls, tmp_path: Path) -> None:
    lite = Settings(home=tmp_path, milvus_token="user:pw", milvus_ca_file=str(tls.ca))
    assert connect_kwargs(lite) == {}  # Milvus Lite: no login, no TLS
    zilliz = Settings(milvus_uri="https://in01-x.zillizcloud.com:19530", milvus_token="key")
    assert connect_kwargs(zilliz) == {"token": "key", "secure": True}
    own = Settings(
        milvus_uri="http://milvus.internal:19530",
        milvus_user="root",
        milvus_password="pw",
        milvus_ca_file=str(tls.ca),
        milvus_server_name="milvus.internal",
    )
    assert connect_kwargs(own) == {
        "user": "root",
        "password": "pw",
        "secure": True,
        "server_pem_path": str(tls.ca),  # pymilvus' name for "trust this CA" alone
        "server_name": "milvus.internal",
    }
    mutual = own.model_copy(
        update={"milvus_cert_file": str(tls.client_cert), "milvus_key_file": str(tls.client_key)}
    )
    assert connect_kwargs(mutual) == {
        "user": "root",
        "password": "pw",
        "secure": True,
        "ca_pem_path": str(tls.ca),
        "client_pem_path": str(tls.client_cert),
        "client_key_path": str(tls.client_key),
        "server_name": "milvus.internal",
    }


def test_the_store_gives_pymilvus_the_login(monkeypatch: pytest.MonkeyPatch) -> None:
    import pymilvus

    seen: list[tuple[str, dict]] = []

    class Recorder:
        def __init__(self, uri: str, **kwargs: object) -> None:
            seen.append((uri, kwargs))

        def has_collection(self, name: str, **_: object) -> bool:
            return False

    monkeypatch.setattr(pymilvus, "MilvusClient", Recorder)
    from streams.store import MilvusStore

    s = Settings(milvus_uri="https://milvus.example:19530", milvus_token="key")
    MilvusStore(s)
    assert seen == [("https://milvus.example:19530", {"token": "key", "secure": True})]


# --- a broker with production listeners ------------------------------------------------------


@dataclass(frozen=True)
class SecureBroker:
    plaintext: str
    sasl_ssl: str
    ssl: str


@pytest.fixture(scope="module")
def secure_broker(tls: Tls, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    if os.environ.get("RAGSTREAM_TEST_NO_BROKER"):
        pytest.fail("this run has no broker (RAGSTREAM_TEST_NO_BROKER): mark the test kafka")
    home = tmp_path_factory.mktemp("secure-kafka")
    local = Settings(home=home, broker=f"127.0.0.1:{kafka_local.free_port()}")
    listeners = kafka_local.SecureListeners(
        sasl_ssl_port=kafka_local.free_port(),
        ssl_port=kafka_local.free_port(),
        keystore=tls.keystore,
        truststore=tls.ca,
        users={USER: PASSWORD},
    )
    info = kafka_local.up(local, secure=listeners, wait_s=120)  # a busy CI machine
    try:
        yield SecureBroker(
            info.bootstrap,
            f"127.0.0.1:{listeners.sasl_ssl_port}",
            f"127.0.0.1:{listeners.ssl_port}",
        )
    finally:
        kafka_local.down(local)


def _pipeline_settings(tls: Tls, broker: str, home: Path, mechanism: str) -> Settings:
    from tests.conftest import _test_settings

    return _test_settings(broker, home).model_copy(
        update={
            "kafka_security_protocol": "SASL_SSL",
            "kafka_sasl_mechanism": mechanism,
            "kafka_username": USER,
            "kafka_password": SecretStr(PASSWORD),
            "kafka_ca_file": str(tls.ca),
        }
    )


def ragstream(settings: Settings, *args: str, timeout_s: float = 60) -> tuple[int, str, float]:
    """The CLI in a child process with ``settings``: (exit status, stderr, seconds)."""
    env = {**os.environ, **settings.to_env(), "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "ragstream.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=ROOT,
    )
    return out.returncode, out.stdout + out.stderr, time.monotonic() - started


@pytest.mark.kafka
def test_pipeline_end_to_end_over_sasl_ssl_scram(
    secure_broker: SecureBroker, tls: Tls, tmp_path: Path, django_docs: Path, chunker
) -> None:
    """Every client of the pipeline (the stages' Faust apps, their retry and state
    consumers, the publisher, the progress reader) through SASL_SSL with SCRAM-SHA-512: the
    pages' chunks reach Milvus. Nothing uses the PLAINTEXT listener."""
    settings = _pipeline_settings(tls, secure_broker.sasl_ssl, tmp_path / "home", "SCRAM-SHA-512")
    site = tmp_path / "site"
    for src in subset(corpus_files(django_docs), 3):
        dst = site / src.relative_to(django_docs)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    files = corpus_files(site)
    with CorpusServer(site) as server:
        expected = expected_index(chunker, server, files)
        base = baseline(settings)
        worker = Worker(settings)
        try:
            assert publish_urls(settings, [server.url_of(p) for p in files]) == len(files)
            snap = wait_for(settings, base, len(files), worker, timeout_s=240)
        finally:
            worker.stop()
    assert snap.dead == {}, snap
    assert {r["id"]: r["text"] for r in milvus_rows(settings)} == expected
    assert PASSWORD not in worker.log.read_text(errors="replace")


@pytest.mark.kafka
@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_each_mechanism_connects_and_a_wrong_password_fails_fast(
    secure_broker: SecureBroker, tls: Tls, tmp_path: Path, mechanism: str
) -> None:
    good = _pipeline_settings(tls, secure_broker.sasl_ssl, tmp_path / "home", mechanism)
    code, out, _ = ragstream(good, "status")
    assert code == 0, out
    assert PASSWORD not in out

    bad = good.model_copy(update={"kafka_password": SecretStr(WRONG)})
    # the worker too: it stops with the refusal instead of restarting its stages forever
    for command in (["publish", "http://127.0.0.1:9/x"], ["status"], ["worker"]):
        code, out, took = ragstream(bad, *command, timeout_s=30)
        assert code == 2, out  # a setting to fix (not 69, "try again later")
        assert (
            f"ragstream: error: Kafka at {secure_broker.sasl_ssl}: authentication failed for "
            f"user 'alice' with {mechanism}"
        ) in out, out
        assert WRONG not in out
        assert took < 30


@pytest.mark.kafka
def test_tls_that_does_not_verify_is_a_clear_error(
    secure_broker: SecureBroker, tls: Tls, tmp_path: Path
) -> None:
    good = _pipeline_settings(tls, secure_broker.sasl_ssl, tmp_path / "home", "PLAIN")
    other_ca = good.model_copy(update={"kafka_ca_file": str(tls.other_ca)})
    code, out, took = ragstream(other_ca, "status", timeout_s=30)
    assert code == 2, out
    assert "its TLS certificate does not verify" in out and str(tls.other_ca) in out, out
    # SASL_SSL spoken to the PLAINTEXT listener: refused, and said so
    code, out, _ = ragstream(good.model_copy(update={"broker": secure_broker.plaintext}), "status")
    assert code == 2 and "closed the connection during the SASL_SSL handshake" in out, out


@pytest.mark.kafka
def test_ssl_with_a_client_certificate(
    secure_broker: SecureBroker, tls: Tls, tmp_path: Path
) -> None:
    from tests.conftest import _test_settings

    mtls = _test_settings(secure_broker.ssl, tmp_path / "home").model_copy(
        update={
            "kafka_security_protocol": "SSL",
            "kafka_ca_file": str(tls.ca),
            "kafka_cert_file": str(tls.client_cert),
            "kafka_key_file": str(tls.client_key),
        }
    )

    async def brokers(s: Settings) -> int:
        async with kafka.started(kafka.admin(s), s) as admin:
            return len((await admin.describe_cluster())["brokers"])

    assert asyncio.run(brokers(mtls)) == 1
    anonymous = mtls.model_copy(update={"kafka_cert_file": "", "kafka_key_file": ""})
    with pytest.raises(KafkaRefused, match="want a client certificate"):
        asyncio.run(brokers(anonymous))


def test_stages_create_topics_with_the_replication_asked(tmp_path: Path) -> None:
    from agents.app import create_app

    app = create_app(Settings(home=tmp_path, topic_replicas=3), "write")
    assert app.conf.topic_replication_factor == 3


@pytest.mark.kafka
def test_topics_the_broker_will_not_create_are_an_error(
    secure_broker: SecureBroker, tls: Tls, tmp_path: Path
) -> None:
    """A managed Kafka refuses topics of too few replicas; the admin client only reports
    it in the answer. Unchecked, every later produce would fail on a missing topic."""
    from streams.topics import ensure_topics

    s = _pipeline_settings(tls, secure_broker.sasl_ssl, tmp_path / "home", "PLAIN")
    with pytest.raises(ConfigError, match="InvalidReplicationFactor.*RAGSTREAM_TOPIC_REPLICAS=2"):
        asyncio.run(ensure_topics(s.model_copy(update={"topic_replicas": 2})))
