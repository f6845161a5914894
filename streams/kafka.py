"""The one place that builds Kafka clients, retries Kafka calls and translates Kafka's errors.

Why one module: how to reach the broker is a property of the deployment, not of each caller.
Every aiokafka client ragstream makes (:func:`producer`, :func:`consumer`, :func:`admin`) and
the Faust app of each stage (:func:`faust_broker`) gets its connection from
:func:`connection` (and :func:`ssl_context`), so what every client must share (the bootstrap
servers, TLS with a CA and an optional client certificate, SASL PLAIN or SCRAM credentials)
is written once and reaches them all; ``tests/test_kafka_security.py`` fails if a client is
built anywhere else.
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
  the CLI prints one line and a stage knows to wait rather than dead-letter. **A broker that
  refuses us** (wrong password, unknown mechanism, a certificate that does not verify) is
  :class:`~streams.errors.KafkaRefused`, a setting to fix: aiokafka logs that cause and raises
  only "Unable to bootstrap", so on a secured connection :func:`translated` asks once more
  itself (:func:`handshake`) to name the cause instead of blaming the network.

Tests may build their own clients; nothing else imports aiokafka's client classes to connect.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.conn import collect_hosts, create_conn
from aiokafka.errors import (
    AuthenticationFailedError,
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    IllegalSaslStateError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    NoBrokersAvailable,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    UnsupportedSaslMechanismError,
    for_code,
)

from streams.errors import ConfigError, KafkaRefused, KafkaUnavailable, Unavailable
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


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context of every client (``None`` without TLS): the broker's certificate is
    verified, host name included, against ``kafka_ca_file`` or the system's CAs, and the
    client certificate is offered when one is configured. Files that cannot be used are a
    :class:`ConfigError` naming them."""
    if not settings.kafka_tls:
        return None
    password = settings.kafka_key_password.get_secret_value()
    try:
        context = ssl.create_default_context(cafile=settings.kafka_ca_file or None)
        if settings.kafka_cert_file:
            # a callable, even for no password: OpenSSL would otherwise prompt on the terminal
            context.load_cert_chain(
                settings.kafka_cert_file, settings.kafka_key_file, password=lambda: password
            )
    except (OSError, ssl.SSLError) as exc:
        files = ", ".join(
            f"{name}={path}"
            for name, path in (
                ("RAGSTREAM_KAFKA_CA_FILE", settings.kafka_ca_file),
                ("RAGSTREAM_KAFKA_CERT_FILE", settings.kafka_cert_file),
                ("RAGSTREAM_KAFKA_KEY_FILE", settings.kafka_key_file),
            )
            if path
        )
        raise ConfigError(
            f"cannot use the Kafka TLS files ({files or 'system CAs'}): {exc}"
        ) from exc
    return context


def connection(settings: Settings) -> dict[str, Any]:
    """Keyword arguments every aiokafka client gets: where the broker is, and how to
    encrypt (:func:`ssl_context`) and authenticate (SASL PLAIN or SCRAM)."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.broker,
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_tls:
        kwargs["ssl_context"] = ssl_context(settings)
    if settings.kafka_sasl:
        kwargs["sasl_mechanism"] = settings.kafka_sasl_mechanism
        kwargs["sasl_plain_username"] = settings.kafka_username
        kwargs["sasl_plain_password"] = settings.kafka_password.get_secret_value()
    return kwargs


def faust_broker(settings: Settings) -> dict[str, Any]:
    """The same connection in the words of ``faust.App``'s settings (``agents/app.py``):
    Faust hands ``broker_credentials`` to each aiokafka client it makes as the same
    security protocol, mechanism, user, password and TLS context (SCRAM included)."""
    import faust  # the stages' dependency; the CLI's other commands need not load it

    conf: dict[str, Any] = {"broker": f"kafka://{settings.broker}"}
    context = ssl_context(settings)
    if settings.kafka_sasl:
        conf["broker_credentials"] = faust.SASLCredentials(
            username=settings.kafka_username,
            password=settings.kafka_password.get_secret_value(),
            ssl_context=context,  # with one, Faust says SASL_SSL; without, SASL_PLAINTEXT
            mechanism=settings.kafka_sasl_mechanism,
        )
    elif context is not None:
        conf["broker_credentials"] = faust.SSLCredentials(context)
    return conf


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


def created(response: Any, settings: Settings) -> None:
    """Raise what a CreateTopics ``response`` refused: the admin client returns each
    topic's error instead of raising it, and a topic that silently was not made (a managed
    Kafka's replication policy, a missing ACL) would fail every produce later. A topic made
    meanwhile by someone else is fine."""
    problems = []
    for topic, code, *message in response.topic_errors:
        if code in (0, TopicAlreadyExistsError.errno):
            continue
        error = for_code(code)(message[0] if message and message[0] else "")
        if isinstance(error, REFUSALS):
            raise refused(error, settings)
        problems.append(f"{topic}: {type(error).__name__} {error}".strip())
    if problems:
        raise ConfigError(
            f"Kafka at {settings.broker} did not create {'; '.join(problems)} "
            f"(RAGSTREAM_TOPIC_REPLICAS={settings.topic_replicas}: a managed Kafka may want "
            "3; or create the topics beforehand, see docs/production.md)"
        )


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


#: Failures that say the broker answered and refused us: credentials, mechanism, TLS
#: verification, permissions. Not retriable: the same settings fail the same way.
REFUSALS: tuple[type[BaseException], ...] = (
    SaslAuthenticationFailed,
    AuthenticationFailedError,
    UnsupportedSaslMechanismError,
    IllegalSaslStateError,
    TopicAuthorizationFailedError,
    GroupAuthorizationFailedError,
    ClusterAuthorizationFailedError,
    ssl.SSLError,
)

AUTHORIZATION_ERRORS = (
    TopicAuthorizationFailedError,
    GroupAuthorizationFailedError,
    ClusterAuthorizationFailedError,
)

#: Longest waits of :func:`handshake` for one bootstrap server: to connect (a server that
#: does not answer is away, whatever aiokafka made of it), then to be accepted or refused.
#: A running event loop waits for them (:func:`translated` is synchronous), only after a
#: secured connection failed.
TCP_TIMEOUT_S = 3.0
HANDSHAKE_TIMEOUT_S = 10.0


def unavailable(exc: BaseException, broker: str | None = None, what: str = "") -> KafkaUnavailable:
    """The one message for a broker that cannot be reached: which broker, what failed, and
    what to do about it."""
    where = f"Kafka at {broker}" if broker else "Kafka"
    doing = f" ({what})" if what else ""
    detail = str(exc) or type(exc).__name__
    return KafkaUnavailable(f"cannot reach {where}{doing}: {detail} ({HINT})")


def refused(exc: BaseException, settings: Settings) -> KafkaRefused:
    """The one message for a broker that refused us: what it refused, and which settings
    to look at (never a secret's value)."""
    where = f"Kafka at {settings.broker}"
    detail = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, ssl.SSLCertVerificationError):
        ca = settings.kafka_ca_file or "(empty: the system's CAs)"
        return KafkaRefused(
            f"{where}: its TLS certificate does not verify ({exc.verify_message}); "
            f"RAGSTREAM_KAFKA_CA_FILE={ca} must hold the CA that signed it"
        )
    if isinstance(exc, ssl.SSLError):
        return KafkaRefused(
            f"{where}: the TLS handshake failed ({detail}); does the listener speak "
            f"RAGSTREAM_KAFKA_SECURITY_PROTOCOL={settings.kafka_security_protocol}, and "
            "accept the client certificate (RAGSTREAM_KAFKA_CERT_FILE)?"
        )
    if isinstance(exc, Dropped):
        return KafkaRefused(
            f"{where} closed the connection during the "
            f"{settings.kafka_security_protocol} handshake ({detail}): does this listener "
            f"speak RAGSTREAM_KAFKA_SECURITY_PROTOCOL={settings.kafka_security_protocol}, and "
            "does it want a client certificate (RAGSTREAM_KAFKA_CERT_FILE)?"
        )
    if isinstance(exc, UnsupportedSaslMechanismError):
        return KafkaRefused(
            f"{where} does not offer RAGSTREAM_KAFKA_SASL_MECHANISM="
            f"{settings.kafka_sasl_mechanism}: {detail}"
        )
    if isinstance(
        exc,
        TopicAuthorizationFailedError
        | GroupAuthorizationFailedError
        | ClusterAuthorizationFailedError,
    ):
        return KafkaRefused(
            f"{where}: user {settings.kafka_username!r} is not authorized ({detail}); the "
            "broker's ACLs must allow it on ragstream's topics and groups (docs/production.md)"
        )
    return KafkaRefused(
        f"{where}: authentication failed for user {settings.kafka_username!r} with "
        f"{settings.kafka_sasl_mechanism or settings.kafka_security_protocol} ({detail}); "
        "check RAGSTREAM_KAFKA_USERNAME, RAGSTREAM_KAFKA_PASSWORD and "
        "RAGSTREAM_KAFKA_SASL_MECHANISM"
    )


class Dropped(ConnectionError):
    """The broker accepted a TCP connection, then closed it during the TLS or SASL
    handshake: the listener speaks another protocol, or wants a client certificate."""


async def _tcp_answers(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), TCP_TIMEOUT_S)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def handshake(settings: Settings) -> BaseException | None:
    """Connect to the bootstrap servers one at a time as a client would (TLS, SASL) and
    return the refusal of the first that answers, or ``None`` when one accepts us or none
    answers. Why: aiokafka only logs why a bootstrap connection failed."""
    kwargs = connection(settings)
    del kwargs["bootstrap_servers"]
    for host, port, _ in collect_hosts(settings.broker, randomize=False):
        if not await _tcp_answers(host, port):
            continue
        try:
            conn = await asyncio.wait_for(
                create_conn(
                    host, port, request_timeout_ms=int(HANDSHAKE_TIMEOUT_S * 1000), **kwargs
                ),
                HANDSHAKE_TIMEOUT_S,
            )
        except REFUSALS as exc:
            return exc
        except (KafkaConnectionError, ConnectionError) as exc:  # it answered TCP, then hung up
            return Dropped(str(exc) or type(exc).__name__)
        except Exception as exc:  # gone meanwhile: the next one, or "unavailable"
            log.debug("handshake with %s:%s: %r", host, port, exc)
            continue
        conn.close()
        return None
    return None


def _handshake_now(settings: Settings) -> BaseException | None:
    """:func:`handshake` from synchronous code, inside a running event loop or not."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(handshake(settings))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, handshake(settings)).result()


@contextlib.contextmanager
def translated(settings: Settings, what: str = "") -> Iterator[None]:
    """Inside, a refusal (:data:`REFUSALS`) becomes :class:`KafkaRefused`, and a connection
    failure (:data:`CONNECTION_ERRORS`) :class:`KafkaUnavailable` naming the broker, unless
    a secured connection's :func:`handshake` shows it was a refusal; everything else
    passes unchanged."""
    try:
        yield
    except (KafkaUnavailable, KafkaRefused):
        raise
    except REFUSALS as exc:
        raise refused(exc, settings) from exc
    except CONNECTION_ERRORS as exc:
        if settings.kafka_security_protocol != "PLAINTEXT":
            cause = _handshake_now(settings)
            if cause is not None:
                raise refused(cause, settings) from exc
        raise unavailable(exc, settings.broker, what) from exc
