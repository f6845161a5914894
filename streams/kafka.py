"""The one place that builds Kafka clients, retries Kafka calls and translates Kafka's errors.

Why one module: how to reach the broker is a property of the deployment, not of each caller.
Every aiokafka client ragstream makes (:func:`producer`, :func:`consumer`, :func:`admin`) and
the Faust app of each stage (:func:`faust_broker`) gets its connection from
:func:`connection`, so settings that every client must share (the bootstrap servers today;
SASL and TLS when production connections need them) are written once and reach them all.
This is the I/O boundary in the sense of httpx's ``_transports/`` and of quixstreams'
``kafka/`` package (its producer, consumer and admin wrappers): the rest of the code decides
what to read and write, and only this module knows how aiokafka is configured, when a call
is worth repeating, and how its failures look to a user.

Two rules live here and nowhere else:

- **Retry what may heal, and only that** (:func:`retrying`, :func:`retriable`): aiokafka
  marks each error ``retriable`` when repeating the request may succeed (no leader or group
  coordinator yet, connection lost); ours (:class:`~streams.errors.Unavailable`) say the same.
  Anything else is raised at once: repeating an authorization or a malformed request fails
  the same way, only later.
- **A broker that is not there is** :class:`~streams.errors.KafkaUnavailable` (:func:`translated`,
  :func:`unavailable`), with one message naming the broker and how to start a local one, so
  the CLI prints one line and a stage knows to wait rather than dead-letter.

Tests may build their own clients; nothing else imports aiokafka's client classes to connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError, NoBrokersAvailable

from streams.errors import KafkaUnavailable, Unavailable
from streams.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How a producer of ragstream sends, whoever uses it: a send is done once every in-sync
#: replica has it (``acks=all``), and a send the client retries is not written twice
#: (idempotence), so "acknowledged" means "will be consumed exactly in this order, once".
PRODUCER_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "enable_idempotence": True,
    "linger_ms": 5,
    "request_timeout_ms": 30000,
}

#: How a consumer of ragstream reads: it commits explicitly, after the work is done (never
#: on a timer), and with no usable committed offset it starts at the earliest record still
#: there (``ops/replay.py`` relies on that when it plans a reset).
CONSUMER_DEFAULTS: dict[str, Any] = {
    "enable_auto_commit": False,
    "auto_offset_reset": "earliest",
}

ADMIN_DEFAULTS: dict[str, Any] = {"request_timeout_ms": 15000}

#: What a user can do when the broker is not there.
HINT = "is it running? `ragstream kafka up` starts a local one"


# --- clients ----------------------------------------------------------------------------


def connection(settings: Settings) -> dict[str, Any]:
    """Keyword arguments every aiokafka client gets: where the broker is, and (when the
    settings grow them) how to authenticate and encrypt."""
    return {"bootstrap_servers": settings.broker}


def faust_broker(settings: Settings) -> dict[str, Any]:
    """The same connection in the words of ``faust.App``'s settings (``agents/app.py``)."""
    return {"broker": f"kafka://{settings.broker}"}


def producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    """A producer (not started) with :data:`PRODUCER_DEFAULTS`; ``overrides`` win."""
    return AIOKafkaProducer(**connection(settings), **{**PRODUCER_DEFAULTS, **overrides})


def consumer(settings: Settings, *topics: str, **overrides: Any) -> AIOKafkaConsumer:
    """A consumer (not started) of ``topics`` with :data:`CONSUMER_DEFAULTS`; without a
    ``group_id`` override it joins no group (assign and seek; commits are refused)."""
    return AIOKafkaConsumer(*topics, **connection(settings), **{**CONSUMER_DEFAULTS, **overrides})


def admin(settings: Settings, **overrides: Any) -> AIOKafkaAdminClient:
    """An admin client (not started) with :data:`ADMIN_DEFAULTS`; ``overrides`` win."""
    return AIOKafkaAdminClient(**connection(settings), **{**ADMIN_DEFAULTS, **overrides})


C = TypeVar("C", AIOKafkaProducer, AIOKafkaConsumer, AIOKafkaAdminClient)


async def _close(client: AIOKafkaProducer | AIOKafkaConsumer | AIOKafkaAdminClient) -> None:
    if isinstance(client, AIOKafkaAdminClient):
        await client.close()
    else:
        await client.stop()


@contextlib.asynccontextmanager
async def started(client: C, settings: Settings) -> AsyncIterator[C]:
    """``client`` started, and stopped (closed) on the way out, whatever happens inside.

    A broker that cannot be reached at start is :class:`KafkaUnavailable` (at once: aiokafka
    tries each bootstrap server once), and so is one that goes away inside the block.
    """
    with translated(settings):
        try:
            await client.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await _close(client)
            raise
        try:
            yield client
        finally:
            await _close(client)


async def partitions(client: AIOKafkaAdminClient, topics: Iterable[str]) -> list[TopicPartition]:
    """Every partition of those ``topics`` that exist, sorted; a missing topic has none.

    Asks for the metadata of all topics, fresh from the broker (a topic created a moment ago
    is seen): naming a topic in a metadata request would create it on a broker with
    ``auto.create.topics.enable`` (the local one has it).
    """
    wanted = set(topics)
    found = {
        t["topic"]: t["partitions"]
        for t in await client.describe_topics()
        if t["topic"] in wanted and not t["error_code"]
    }
    return [
        TopicPartition(topic, p["partition"])
        for topic in sorted(found)
        for p in sorted(found[topic], key=lambda p: p["partition"])
    ]


# --- retrying ---------------------------------------------------------------------------


def retriable(exc: BaseException) -> bool:
    """Whether the same call may succeed if made again.

    aiokafka's verdict (``KafkaError.retriable``) and ours (``Unavailable.retriable``), plus
    timeouts: aiokafka leaves ``KafkaTimeoutError`` unmarked because a produce that timed
    out may still have happened, but the calls retried here (reads, metadata, idempotent
    sends) can be repeated safely.
    """
    if isinstance(exc, KafkaError | Unavailable):
        return bool(getattr(exc, "retriable", False)) or isinstance(exc, KafkaTimeoutError)
    return isinstance(exc, TimeoutError | ConnectionError)


async def retrying(
    what: str,
    call: Callable[[], Awaitable[T]],
    *,
    deadline_s: float | None = 30.0,
    first_delay_s: float = 0.2,
    max_delay_s: float = 2.0,
    broker: str | None = None,
    on_retry: Callable[[BaseException, float], None] | None = None,
) -> T:
    """``await call()``, again while it fails with a :func:`retriable` error.

    The delay between attempts doubles from ``first_delay_s`` up to ``max_delay_s``; past
    ``deadline_s`` (``None``: never) the last retriable error is raised as
    :class:`KafkaUnavailable` naming ``what`` (and ``broker``). A failure that is not
    retriable is raised at once, unchanged. ``on_retry(exc, delay)`` is told of each retry
    (to log it, or to show it as a server's readiness).
    """
    give_up = None if deadline_s is None else time.monotonic() + deadline_s
    delay = first_delay_s
    while True:
        try:
            return await call()
        except Exception as exc:
            if not retriable(exc):
                raise
            if give_up is not None and time.monotonic() + delay > give_up:
                if isinstance(exc, KafkaUnavailable):
                    raise
                raise unavailable(exc, broker, what) from exc
            if on_retry is not None:
                on_retry(exc, delay)
            else:
                log.debug("%s: %r; retrying in %.1f s", what, exc, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_delay_s)


# --- translating ------------------------------------------------------------------------

#: Failures that say the broker cannot be reached (or did not answer in time), rather than
#: that it refused what was asked; the last three come from the socket layer (a refused
#: connection, a name that does not resolve) when aiokafka does not wrap them.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    KafkaConnectionError,
    NoBrokersAvailable,
    KafkaTimeoutError,
    TimeoutError,
    ConnectionError,
    socket.gaierror,
)


def unavailable(exc: BaseException, broker: str | None = None, what: str = "") -> KafkaUnavailable:
    """The one message for a broker that cannot be reached: which broker, what failed, and
    what to do about it."""
    where = f"Kafka at {broker}" if broker else "Kafka"
    doing = f" ({what})" if what else ""
    detail = str(exc) or type(exc).__name__
    return KafkaUnavailable(f"cannot reach {where}{doing}: {detail} ({HINT})")


@contextlib.contextmanager
def translated(settings: Settings, what: str = "") -> Iterator[None]:
    """Inside, a connection failure (:data:`CONNECTION_ERRORS`) becomes
    :class:`KafkaUnavailable` naming the broker; everything else passes unchanged."""
    try:
        yield
    except KafkaUnavailable:
        raise
    except CONNECTION_ERRORS as exc:
        raise unavailable(exc, settings.broker, what) from exc
