"""The Kafka boundary (``streams/kafka.py``): what is retried, what a missing broker looks
like, and which partitions a topic listing sees."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka.admin import NewTopic
from aiokafka.errors import (
    GroupCoordinatorNotAvailableError,
    KafkaConnectionError,
    KafkaTimeoutError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)

from devtools import kafka_local
from streams import kafka
from streams.errors import KafkaRefused, KafkaUnavailable, StoreUnavailable
from streams.settings import Settings


class Flaky:
    """A call that fails with ``errors`` in turn, then answers ``"ok"``."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def retry(call: Flaky, **kw: object) -> str:
    kw = {"first_delay_s": 0.001, "max_delay_s": 0.002, **kw}
    return asyncio.run(kafka.retrying("testing", call, **kw))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "error",
    [
        KafkaConnectionError("gone"),
        GroupCoordinatorNotAvailableError(),
        UnknownTopicOrPartitionError(),
        KafkaTimeoutError(),
        TimeoutError(),
        StoreUnavailable("milvus away"),
    ],
)
def test_retriable_errors_are_retried(error: BaseException) -> None:
    call = Flaky(error, error)
    assert retry(call) == "ok"
    assert call.calls == 3


@pytest.mark.parametrize(
    "error", [TopicAuthorizationFailedError(), ValueError("bad"), FileNotFoundError("x")]
)
def test_other_errors_are_raised_at_once(error: BaseException) -> None:
    call = Flaky(error)
    with pytest.raises(type(error)):
        retry(call)
    assert call.calls == 1


def test_retries_stop_at_the_deadline_as_unavailable() -> None:
    call = Flaky(*[KafkaConnectionError("refused")] * 1000)
    t0 = time.monotonic()
    with pytest.raises(KafkaUnavailable) as info:
        retry(call, deadline_s=0.3, first_delay_s=0.01, max_delay_s=0.05, broker="b:1")
    assert time.monotonic() - t0 < 2
    assert 3 < call.calls < 1000
    message = str(info.value)
    assert "b:1" in message and "testing" in message and "ragstream kafka up" in message
    assert isinstance(info.value.__cause__, KafkaConnectionError)


def test_delays_double_up_to_the_cap() -> None:
    seen: list[float] = []
    call = Flaky(*[KafkaConnectionError()] * 5)
    retry(call, first_delay_s=0.001, max_delay_s=0.004, on_retry=lambda e, d: seen.append(d))
    assert seen == [0.001, 0.002, 0.004, 0.004, 0.004]


def test_translated_names_the_broker() -> None:
    settings = Settings(broker="kafka.example:9092")
    expected = r"cannot reach Kafka at kafka\.example:9092"
    with pytest.raises(KafkaUnavailable, match=expected), kafka.translated(settings):
        raise KafkaConnectionError("Unable to bootstrap")
    refused = r"Kafka at kafka\.example:9092: user '' is not authorized"
    with pytest.raises(KafkaRefused, match=refused) as info, kafka.translated(settings):
        raise TopicAuthorizationFailedError()  # refused, not away: a setting to fix
    assert not isinstance(info.value, KafkaUnavailable)
    assert isinstance(info.value.__cause__, TopicAuthorizationFailedError)


@pytest.mark.parametrize("make", ["admin", "consumer", "producer"])
def test_absent_broker_is_unavailable_fast(make: str) -> None:
    settings = Settings(broker=f"127.0.0.1:{kafka_local.free_port()}")

    async def scenario() -> None:
        async with kafka.started(getattr(kafka, make)(settings), settings):
            raise AssertionError("started without a broker")

    t0 = time.monotonic()
    with pytest.raises(KafkaUnavailable) as info:
        asyncio.run(scenario())
    assert time.monotonic() - t0 < 10
    assert settings.broker in str(info.value) and "ragstream kafka up" in str(info.value)


def test_clients_get_the_shared_settings() -> None:
    settings = Settings(broker="h1:1,h2:2")
    assert kafka.connection(settings) == {
        "bootstrap_servers": "h1:1,h2:2",
        "security_protocol": "PLAINTEXT",
    }
    assert kafka.faust_broker(settings)["broker"] == "kafka://h1:1,h2:2"


def test_partitions_see_new_topics_and_create_none(settings: Settings) -> None:
    new, missing = settings.topic("fresh"), settings.topic("never")

    async def scenario() -> None:
        async with kafka.started(kafka.admin(settings), settings) as client:
            assert await kafka.partitions(client, [new, missing]) == []
            await client.create_topics([NewTopic(new, 3, 1)])
            deadline = time.monotonic() + 15
            while not (tps := await kafka.partitions(client, [new, missing])):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            assert [(tp.topic, tp.partition) for tp in tps] == [(new, 0), (new, 1), (new, 2)]
            assert missing not in await client.list_topics()

    asyncio.run(scenario())
