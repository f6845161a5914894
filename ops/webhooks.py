"""The webhook server: signed HTTP requests in, ``urls`` messages out, answered after the acks.

Two routes turn outside events into ``urls`` messages: ``POST /v1/urls`` (a generic, signed
list of URLs) and ``POST /v1/github`` (GitHub ``push`` events: changed files become
raw-content URLs, removed files become deletes). A request is answered ``202`` only after
Kafka acknowledged every one of its messages (``acks=all``), so a sender that saw ``202``
may forget the event; anything else (``4xx`` with nothing published, ``503`` with possibly
some published) is safe to resend, because re-ingesting a page is idempotent downstream.

Everything is validated before the first message is produced, every URL of the request
included: a request is published whole or (on ``4xx``) not at all. The process starts without a
model and without Milvus; see docs/webhooks.md.

The same server answers ``GET /v1/search`` (docs/http-api.md): ragstream's HTTP API for
reading the index, which opens Milvus and loads the model on its first search.

Replays: the generic route's signature covers a timestamp (``"<timestamp>.<body>"``, as
Stripe and Slack do), refused outside ``webhook_tolerance_s``; both routes remember what they
published (delivery ids, and keys derived from what the signature covers, since the delivery
headers themselves are not signed) for ``webhook_dedup_s`` and answer a repeat
``200 {"duplicate": true}`` without publishing. The memory is bounded and survives a restart:
each key is written to the compacted ``webhooks.deliveries`` topic after the request's
messages were acknowledged, and read back (then followed) before the server says it is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import ipaddress
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from datetime import datetime
from functools import cache
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from jsonschema import Draft202012Validator
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ops.publisher import CONNECT_BACKOFF_S, Publisher
from ops.search import MAX_K, Searcher, check_query
from streams import kafka, metrics, runfiles
from streams.errors import (
    BadRequest,
    ConfigError,
    DecodeError,
    KafkaUnavailable,
    RagstreamError,
    Rejected,
    StoreUnavailable,
)
from streams.github import file_request, path_matches, raw_url, split_list
from streams.ids import normalize_url
from streams.messages import UrlRequest, decode_url, encode_url, schema, utcnow
from streams.settings import Settings
from streams.topics import DELIVERIES

log = logging.getLogger(__name__)

GENERIC_SIGNATURE = "X-Ragstream-Signature-256"
GENERIC_TIMESTAMP = "X-Ragstream-Timestamp"
GENERIC_DELIVERY = "X-Ragstream-Delivery"
GITHUB_SIGNATURE = "X-Hub-Signature-256"
GITHUB_EVENT = "X-GitHub-Event"
GITHUB_DELIVERY = "X-GitHub-Delivery"

#: Longest time reading ``webhooks.deliveries`` at startup may take before it is retried.
LOAD_TIMEOUT_S = 120.0


# --- signatures -------------------------------------------------------------------------


def sign(secret: str, body: bytes) -> str:
    """The signature header value for ``body``: ``sha256=<hex HMAC-SHA256>`` (GitHub's form)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signature_ok(secret: str, body: bytes, header: str | None) -> bool:
    """Whether ``header`` is the signature of ``body``, compared in constant time."""
    if not header:
        return False
    given = header.strip()
    if given[:7].lower() == "sha256=":
        given = "sha256=" + given[7:].lower()
    return hmac.compare_digest(sign(secret, body).encode(), given.encode("utf-8", "replace"))


def timestamped(timestamp: int | str, body: bytes) -> bytes:
    """What ``/v1/urls``' signature covers: ``b"<timestamp>.<body>"``.

    Signing the time with the body is what makes a captured request expire: without it a
    signature stays valid forever and the request can be replayed at will.
    """
    return f"{timestamp}.".encode() + body


def sign_urls(secret: str, body: bytes, timestamp: int) -> str:
    """The ``X-Ragstream-Signature-256`` value of ``body`` sent at ``timestamp`` (unix s)."""
    return sign(secret, timestamped(timestamp, body))


def urls_headers(
    secret: str, body: bytes, *, timestamp: int | None = None, delivery: str | None = None
) -> dict[str, str]:
    """Every header a ``POST /v1/urls`` needs, signed now (or at ``timestamp``)."""
    ts = int(time.time()) if timestamp is None else timestamp
    headers = {
        "Content-Type": "application/json",
        GENERIC_TIMESTAMP: str(ts),
        GENERIC_SIGNATURE: sign_urls(secret, body, ts),
    }
    if delivery is not None:
        headers[GENERIC_DELIVERY] = delivery
    return headers


_TIMESTAMP = re.compile(r"[0-9]{1,12}\Z")


def parse_timestamp(value: str | None) -> int:
    """The ``X-Ragstream-Timestamp`` header as unix seconds, or ``Rejected`` (401) saying what
    to send: a body-only signature (the form before timestamps) lands here too."""
    if value is None:
        raise Rejected(
            401,
            f"missing {GENERIC_TIMESTAMP}: send the current unix time (seconds) in it and sign "
            f"'<timestamp>.<body>' in {GENERIC_SIGNATURE} (a signature of the body alone could "
            "be replayed forever, so it is refused); see docs/webhooks.md",
        )
    if not _TIMESTAMP.match(value.strip()):
        raise Rejected(401, f"{GENERIC_TIMESTAMP} must be unix seconds (an integer), got {value!r}")
    return int(value.strip())


def check_window(timestamp: int, now: float, tolerance_s: float) -> None:
    """``Rejected`` (401) when ``timestamp`` is further than ``tolerance_s`` from ``now``."""
    skew = now - timestamp
    if abs(skew) > tolerance_s:
        when = "old" if skew > 0 else "in the future"
        raise Rejected(
            401,
            f"{GENERIC_TIMESTAMP} is {abs(skew):.0f} s {when}; the tolerance is {tolerance_s} s "
            "(sign each request when it is sent, and check the sender's clock)",
        )


_DELIVERY_ID = re.compile(r"[\x21-\x7e]{1,200}\Z")


def delivery_id(headers: Any, name: str) -> str | None:
    """The sender's delivery id from header ``name``, if sent; ``BadRequest`` if malformed."""
    value = headers.get(name)
    if value is None:
        return None
    if not _DELIVERY_ID.match(value):
        raise BadRequest(f"{name} must be 1 to 200 printable ASCII characters without spaces")
    return value


# --- POST /v1/urls ----------------------------------------------------------------------

_URLS_KEYS = {"urls", "source", "force"}


@cache
def _url_max_length() -> int:
    return int(schema("urls")["properties"]["url"]["maxLength"])


@cache
def _url_validator() -> Draft202012Validator:
    return Draft202012Validator(schema("urls")["properties"]["url"])


#: Characters no URL may carry raw: C0 controls and DEL. ``urlsplit`` silently drops tab, CR
#: and LF, so without this check the URL validated would not be the URL published.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: A host name after normalisation (lowercase, IDNA): letters, digits, ``-``, ``_``, ``.``.
_HOST_NAME = re.compile(r"[a-z0-9_.-]*[a-z0-9][a-z0-9_.-]*\Z")


def _host_ok(host: str) -> bool:
    if _HOST_NAME.match(host):
        return True
    try:
        ipaddress.ip_address(host)  # an IPv6 literal (brackets already removed)
    except ValueError:
        return False
    return True


def check_url(url: str, where: str) -> str:
    """The normalised form of one URL of a request, or ``BadRequest`` naming it.

    http(s) only (``normalize_url``), no control characters, a syntactically valid host, and
    within the schema's length both as given and normalised (the fetch stage works on the
    normalised form). Names are not resolved here: the SSRF guard runs in the fetch stage,
    on the address actually connected to.
    """
    limit = _url_max_length()
    if len(url) > limit:
        raise BadRequest(f"{where}: URL is {len(url)} characters; the limit is {limit}")
    if (bad := _CONTROL.search(url)) is not None:
        raise BadRequest(f"{where}: URL contains a control character ({bad.group()!r}): {url!r}")
    try:
        normal = normalize_url(url)
    except ValueError as exc:
        raise BadRequest(f"{where}: {exc}") from None
    if not normal.startswith(("http://", "https://")):  # file:// reads local disks: CLI only
        raise BadRequest(f"{where}: only http and https URLs are accepted here: {url!r}")
    if not _host_ok(urlsplit(normal).hostname or ""):
        raise BadRequest(f"{where}: URL host is not a valid host name: {url!r}")
    if len(normal) > limit:
        raise BadRequest(
            f"{where}: URL is {len(normal)} characters once normalised; the limit is {limit}"
        )
    return normal


#: Every field of a ``urls`` message but its URL: messages equal in these share one check.
_SHAPE_FIELDS = tuple(f.name for f in dataclasses.fields(UrlRequest) if f.name != "url")


def check_requests(requests: list[UrlRequest], where: list[str]) -> list[UrlRequest]:
    """``requests`` if every one is a valid URL in a schema-valid message, else BadRequest
    naming the first bad one: all or nothing, checked before anything is produced.

    Every message is checked, at the cost of the schema only once per shape: messages that
    differ only in their URL (all of a ``/v1/urls`` request) share one full validation, and
    each URL is validated against the schema's ``url`` property. A full check of every
    message costs ~70 us, 1.4 s of a blocked event loop for 20,000 URLs; this way the
    20,000 take ~0.6 s, most of it ``normalize_url``.
    """
    shapes: set[tuple[Any, ...]] = set()
    url_schema = _url_validator()
    for req, name in zip(requests, where, strict=True):
        check_url(req.url, name)
        if not url_schema.is_valid(req.url):
            error = next(iter(url_schema.iter_errors(req.url)))
            raise BadRequest(f"{name}: url: {error.message}")
        try:
            shape = tuple(
                orjson.dumps(getattr(req, f), option=orjson.OPT_SORT_KEYS) for f in _SHAPE_FIELDS
            )
            if shape not in shapes:
                decode_url(encode_url(dataclasses.replace(req, url="https://shape.invalid/")))
                shapes.add(shape)
        except DecodeError as exc:
            raise BadRequest(f"{name}: {exc}") from None
        except (TypeError, ValueError) as exc:  # not encodable as JSON
            raise BadRequest(f"{name}: {exc}") from None
    return requests


def parse_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None


def plan_urls(payload: Any) -> list[UrlRequest]:
    """The messages of a ``/v1/urls`` payload, or ``BadRequest`` naming the first problem.

    Duplicate URLs in one request are sent once. Unknown keys are refused rather than
    ignored, so that a misspelt ``"forse": true`` does not silently do something else.
    """
    if not isinstance(payload, dict):
        raise BadRequest(f"body must be a JSON object, got {type(payload).__name__}")
    unknown = sorted(set(payload) - _URLS_KEYS)
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)} (allowed: source, force, urls)")
    if "urls" not in payload:
        raise BadRequest("missing field 'urls' (a non-empty list of http(s) URLs)")
    urls = payload["urls"]
    if not isinstance(urls, list):
        raise BadRequest(f"'urls' must be a list of strings, got {type(urls).__name__}")
    if not urls:
        raise BadRequest("'urls' is empty")
    source = payload.get("source", "webhook")
    if not isinstance(source, str) or not source:
        raise BadRequest("'source' must be a non-empty string")
    force = payload.get("force", False)
    if not isinstance(force, bool):
        raise BadRequest(f"'force' must be true or false, got {orjson.dumps(force).decode()}")
    out: dict[str, str] = {}  # url -> where
    for i, url in enumerate(urls):
        where = f"urls[{i}]"
        if not isinstance(url, str):
            raise BadRequest(f"{where} must be a string, got {type(url).__name__}")
        out.setdefault(url.strip(), where)
    now = utcnow()
    requests = [UrlRequest(url=u, source=source, force=force, requested_at=now) for u in out]
    return check_requests(requests, list(out.values()))


# --- POST /v1/github --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class PushPlan:
    """What a push event asks for: the messages, or why there are none."""

    requests: list[UrlRequest]
    skipped: str | None = None


def _string(obj: Any, key: str, where: str) -> str:
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, str):
        raise BadRequest(f"{where}{key} must be a string (is this a push event payload?)")
    return value


def plan_push(payload: Any, settings: Settings) -> PushPlan:
    """The ``urls`` messages of a GitHub ``push`` payload.

    Commits are applied in order and the last action on a path wins, so a file removed and
    added again in one push is ingested, and one added then removed is deleted. Within one
    commit removals apply before additions. URLs name the branch, not the commit: the page
    identity (``doc_id``) must stay the same across pushes for a change to replace the old
    chunks and a removal to find them; the commit is recorded in ``metadata``.
    """
    if not isinstance(payload, dict):
        raise BadRequest(f"body must be a JSON object, got {type(payload).__name__}")
    ref = _string(payload, "ref", "")
    repo = _string(payload.get("repository"), "full_name", "repository.")
    if not ref.startswith("refs/heads/"):
        return PushPlan([], f"ref {ref} is not a branch")
    branch = ref.removeprefix("refs/heads/")
    branches = split_list(settings.github_branches)
    if branch not in branches:
        return PushPlan([], f"branch {branch} is not one of {', '.join(branches)}")
    commits = payload.get("commits") or []
    if not isinstance(commits, list):
        raise BadRequest("commits must be a list")
    after = payload.get("after") if isinstance(payload.get("after"), str) else None
    globs = split_list(settings.github_globs)
    actions: dict[str, bool] = {}  # path -> delete?
    for i, commit in enumerate(commits):
        for kind, delete in (("removed", True), ("added", False), ("modified", False)):
            paths = commit.get(kind, []) if isinstance(commit, dict) else None
            if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
                raise BadRequest(f"commits[{i}].{kind} must be a list of paths")
            for path in paths:
                if path_matches(path, globs):
                    actions.pop(path, None)  # re-insert: messages follow the order of last action
                    actions[path] = delete
    now = utcnow()
    out = [
        file_request(
            settings.github_raw_base,
            repo,
            branch,
            path,
            commit=after,
            full_ref=ref,
            delete=delete,
            requested_at=now,
        )
        for path, delete in actions.items()
    ]
    return PushPlan(check_requests(out, list(actions)))


# --- replays ----------------------------------------------------------------------------


def retention_s(settings: Settings) -> float:
    """How long a delivery key is remembered: ``webhook_dedup_s``, and never less than twice
    the timestamp tolerance (a request stamped ``tolerance`` s in the future stays acceptable
    for ``2 x tolerance`` s, and its key must outlive that)."""
    return float(max(settings.webhook_dedup_s, 2 * settings.webhook_tolerance_s))


Claim = Literal["duplicate", "busy"] | None


class DeliveryLog:
    """The delivery keys answered within the retention window: pure, bounded, no I/O.

    A request is *claimed* (its keys marked in flight) before publishing and *committed*
    (remembered) only after Kafka acknowledged its messages: a request that failed (503) is
    forgotten, so its sender's retry goes through, while a repeat of one that succeeded is a
    duplicate. Keys are kept oldest first, so expiry and the size cap both drop from the
    front; a key dropped by the cap before it expired is counted in ``evicted_early``.
    """

    def __init__(self, retention_s: float, max_entries: int) -> None:
        self.retention_s = retention_s
        self.max_entries = max_entries
        self.evicted_early = 0
        self._seen: OrderedDict[str, float] = OrderedDict()  # key -> when, oldest first
        self._busy: set[str] = set()

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, key: object) -> bool:
        return key in self._seen

    def expire(self, now: float) -> None:
        cutoff = now - self.retention_s
        while self._seen:
            key, at = next(iter(self._seen.items()))
            if at > cutoff:
                break
            del self._seen[key]

    def remember(self, key: str, at: float, now: float) -> None:
        """Record ``key`` as answered at ``at`` (from this process, the topic, or a peer)."""
        if at <= now - self.retention_s or key in self._seen:
            return
        self._seen[key] = at
        while len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)
            self.evicted_early += 1
            if self.evicted_early in (1, 10, 100) or self.evicted_early % 10_000 == 0:
                log.warning(
                    "delivery log full (%d ids, RAGSTREAM_WEBHOOK_DEDUP_MAX): %d forgotten "
                    "before their retention ended",
                    self.max_entries,
                    self.evicted_early,
                )

    def claim(self, keys: list[str], now: float) -> Claim:
        """``"duplicate"`` if any key was answered, ``"busy"`` if one is in flight, else
        ``None`` with the keys now in flight (``commit`` or ``release`` them)."""
        self.expire(now)
        if any(k in self._seen for k in keys):
            return "duplicate"
        if any(k in self._busy for k in keys):
            return "busy"
        self._busy.update(keys)
        return None

    def release(self, keys: list[str]) -> None:
        self._busy.difference_update(keys)

    def commit(self, keys: list[str], now: float) -> None:
        self.release(keys)
        for key in keys:
            self.remember(key, now, now)


class Deliveries:
    """The delivery log, persisted in the compacted ``<prefix>webhooks.deliveries`` topic.

    At startup the topic is read to its end before the server is ready, so a restart does
    not reopen the replay window; then it is followed, so that processes behind one load
    balancer learn each other's keys within about a second.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = settings.topic(DELIVERIES)
        self.log = DeliveryLog(retention_s(settings), settings.webhook_dedup_max)
        self._consumer: AIOKafkaConsumer | None = None
        self._follow: asyncio.Task[None] | None = None

    def _apply(self, key: bytes | None, value: bytes | None, timestamp_ms: int) -> None:
        if key is None or value is None:  # tombstone, or not ours
            return
        try:
            at = float(orjson.loads(value)["at"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            at = timestamp_ms / 1000
        self.log.remember(key.decode("utf-8", "replace"), at, time.time())

    async def load(self) -> int:
        """Read the topic to its current end (raises if Kafka fails; the caller retries)."""
        consumer = kafka.consumer(self.settings, request_timeout_ms=15000)
        try:
            with kafka.translated(self.settings, f"reading {self.topic}"):
                await consumer.start()
            tps = [TopicPartition(self.topic, 0)]  # written to partition 0 only (``record``)
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            n = 0
            async with asyncio.timeout(LOAD_TIMEOUT_S):  # a stall is reported and retried
                while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                    for records in (await consumer.getmany(timeout_ms=1000)).values():
                        for r in records:
                            self._apply(r.key, r.value, r.timestamp)
                            n += 1
        except TimeoutError:
            await consumer.stop()
            raise KafkaUnavailable(
                f"{self.topic} not read to its end in {LOAD_TIMEOUT_S} s"
            ) from None
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer
        self._follow = asyncio.create_task(self._follow_topic(), name="webhooks-deliveries")
        return n

    async def _follow_topic(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                for records in (await self._consumer.getmany(timeout_ms=1000)).values():
                    for r in records:
                        self._apply(r.key, r.value, r.timestamp)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep following; the next getmany retries
                log.warning("reading %s: %s: %s", self.topic, type(exc).__name__, exc)
                await asyncio.sleep(CONNECT_BACKOFF_S[1])

    async def record(self, producer: AIOKafkaProducer, keys: list[str], route: str) -> None:
        """Persist ``keys`` (after the request's own messages were acknowledged). A failure is
        logged, not answered: the messages are published, and this process remembers."""
        value = orjson.dumps({"at": time.time(), "route": route})
        try:
            async with asyncio.timeout(self.settings.webhook_timeout_s):
                futures = [
                    await producer.send(self.topic, value, key=k.encode(), partition=0)
                    for k in keys
                ]
                await asyncio.gather(*futures)
        except Exception as exc:
            log.warning(
                "delivery ids not persisted to %s (%s: %s): a restart before they expire "
                "would accept a replay",
                self.topic,
                type(exc).__name__,
                exc,
            )

    async def stop(self) -> None:
        if self._follow is not None:
            self._follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follow
            self._follow = None
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None


# --- Kafka ------------------------------------------------------------------------------


class WebhookPublisher(Publisher):
    """The one publisher (``ops/publisher.py``), as the server needs it.

    It connects in the background (:meth:`Publisher.connect`), so the server comes up
    (``/healthz`` 200, ``/readyz`` 503) while Kafka is away instead of crash-looping, and is
    ready only once every remembered delivery is known: a replay accepted during startup
    would defeat the log. Sends wait at most ``webhook_timeout_s`` for their acks.
    """

    def __init__(self, settings: Settings) -> None:
        super().__init__(
            settings, linger_ms=2, request_timeout_ms=int(settings.webhook_timeout_s * 1000)
        )
        self.deliveries = Deliveries(settings)
        self._task: asyncio.Task[None] | None = None

    def start_in_background(self) -> None:
        self._task = asyncio.create_task(self._connect(), name="webhooks-kafka-connect")

    async def _connect(self) -> None:
        await self.connect(then=self.deliveries.load)
        log.info(
            "producing to %s on %s (%d delivery ids remembered)",
            self.topic,
            self.settings.broker,
            len(self.deliveries.log),
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.deliveries.stop()
        await self.stop_producer()

    async def send_all(self, requests: list[UrlRequest]) -> None:
        """Produce every request, then wait for all their acks (KafkaUnavailable if not)."""
        await self.send(requests, timeout_s=self.settings.webhook_timeout_s)


# --- the application --------------------------------------------------------------------

SETTINGS = web.AppKey("settings", Settings)
PUBLISHER = web.AppKey("publisher", WebhookPublisher)
INSECURE = web.AppKey("insecure", bool)
SEARCHER = web.AppKey("searcher", Searcher)
SEARCH_SLOTS = web.AppKey("search_slots", asyncio.Semaphore)

#: Searches running at once (each in a thread); more wait their turn. One model answers
#: them all, one forward pass at a time, so more threads would only queue inside it.
SEARCH_CONCURRENCY = 4
SEARCH_PARAMS = ("q", "k", "mode", "weights", "url_prefix", "source", "since")


def _json(status: int, **body: Any) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


@web.middleware
async def _errors_as_json(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every refusal as JSON with a message saying what is wrong, never an HTML page."""
    try:
        return await handler(request)
    except Rejected as exc:
        return _json(exc.status, error=str(exc))
    except BadRequest as exc:
        return _json(400, error=str(exc))


async def _read_body(request: web.Request) -> bytes:
    """The raw body, once its size was checked."""
    limit = request.app[SETTINGS].webhook_max_bytes
    if request.content_length is not None and request.content_length > limit:
        raise Rejected(413, f"body is {request.content_length} bytes; the limit is {limit}")
    try:
        return await request.read()  # client_max_size caps what is actually read
    except web.HTTPRequestEntityTooLarge:
        raise Rejected(413, f"body is over the limit of {limit} bytes") from None


def _signature_header(request: web.Request, secret: str, header: str) -> str | None:
    """The signature header's value when the route has a secret; ``None`` when it has none
    and the server runs ``--insecure-no-signature``; else ``Rejected`` (401)."""
    if not secret:
        if not request.app[INSECURE]:  # create_app prevents this; never fail open
            raise Rejected(401, "no secret configured")
        return None
    given = request.headers.get(header)
    if not given:
        raise Rejected(401, f"missing signature header {header}")
    return given


async def _publish(request: web.Request, requests: list[UrlRequest]) -> web.Response:
    try:
        await request.app[PUBLISHER].send_all(requests)
    except KafkaUnavailable as exc:
        log.warning("503 for %d message(s): %s", len(requests), exc)
        return _json(503, error=str(exc))
    return _json(202, accepted=len(requests))


async def _publish_once(
    request: web.Request, requests: list[UrlRequest], keys: list[str], route: str
) -> web.Response:
    """Publish unless one of ``keys`` was answered before (``200 {"duplicate": true}``);
    remember the keys only once Kafka acknowledged every message."""
    publisher = request.app[PUBLISHER]
    deliveries = publisher.deliveries
    claim = deliveries.log.claim(keys, time.time())
    if claim == "duplicate":
        log.info("duplicate delivery on /v1/%s (%s): nothing published", route, keys[0])
        return _json(200, duplicate=True, accepted=0)
    if claim == "busy":
        raise Rejected(409, "the same delivery is being published right now; retry in a moment")
    try:
        response = await _publish(request, requests)
    except BaseException:
        deliveries.log.release(keys)
        raise
    if response.status != 202:
        deliveries.log.release(keys)  # nothing is certain: a retry must go through
        return response
    deliveries.log.commit(keys, time.time())
    if keys and publisher.producer is not None:
        await deliveries.record(publisher.producer, keys, route)
    return response


async def post_urls(request: web.Request) -> web.Response:
    """``/v1/urls``: replay keys are the signature itself (it covers timestamp and body, so a
    copy cannot change it, whereas the unsigned delivery header could be changed) and the
    sender's ``X-Ragstream-Delivery`` if given (a retry with a new timestamp after a lost
    ``202`` is then recognised)."""
    settings = request.app[SETTINGS]
    body = await _read_body(request)
    keys: list[str] = []
    given = _signature_header(request, settings.webhook_secret, GENERIC_SIGNATURE)
    if given is not None:
        raw_ts = request.headers.get(GENERIC_TIMESTAMP)
        timestamp = parse_timestamp(raw_ts)
        signed = timestamped((raw_ts or "").strip(), body)  # the digits exactly as sent
        if not signature_ok(settings.webhook_secret, signed, given):
            hint = ""
            if signature_ok(settings.webhook_secret, body, given):
                hint = f": it signs the body alone; sign '<{GENERIC_TIMESTAMP}>.<body>'"
            raise Rejected(401, f"wrong signature in {GENERIC_SIGNATURE}{hint}")
        check_window(timestamp, time.time(), settings.webhook_tolerance_s)
        keys.append(f"urls:sig:{sign(settings.webhook_secret, signed)[7:]}")
    delivery = delivery_id(request.headers, GENERIC_DELIVERY)
    if delivery is not None:
        keys.append(f"urls:id:{delivery}")
    return await _publish_once(request, plan_urls(parse_json(body)), keys, "urls")


def push_age_s(payload: Any, now: float) -> float | None:
    """Seconds since the push (GitHub's ``repository.pushed_at``: unix seconds in push
    payloads, ISO 8601 elsewhere), or ``None`` when the payload does not say."""
    repo = payload.get("repository") if isinstance(payload, dict) else None
    value = repo.get("pushed_at") if isinstance(repo, dict) else None
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return now - float(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return now - datetime.fromisoformat(value).timestamp()
    return None


async def post_github(request: web.Request) -> web.Response:
    """``/v1/github``: replay keys are the body's digest (the signature covers only the body,
    and a push body is unique: it names its commits and push time) and ``X-GitHub-Delivery``.
    A push older than the retention is refused: its key may be forgotten, so it could be a
    replay that would undo later pushes (re-delete restored files)."""
    settings = request.app[SETTINGS]
    secret = settings.github_secret or settings.webhook_secret
    body = await _read_body(request)
    given = _signature_header(request, secret, GITHUB_SIGNATURE)
    if given is not None and not signature_ok(secret, body, given):
        raise Rejected(401, f"wrong signature in {GITHUB_SIGNATURE}")
    event = request.headers.get(GITHUB_EVENT, "")
    if event == "ping":
        return _json(200, pong=True)
    if event != "push":
        return _json(202, ignored=event or f"(no {GITHUB_EVENT} header)")
    if request.content_type == "application/x-www-form-urlencoded":
        raise BadRequest("set the webhook's content type to application/json")
    payload = parse_json(body)
    plan = plan_push(payload, settings)
    if not plan.requests:
        return _json(202, accepted=0, skipped=plan.skipped or "no matching files")
    age = push_age_s(payload, time.time())
    if age is not None and age > settings.webhook_dedup_s:
        raise Rejected(
            401,
            f"push is {age:.0f} s old (repository.pushed_at); pushes older than "
            f"RAGSTREAM_WEBHOOK_DEDUP_S ({settings.webhook_dedup_s} s) are refused as possible "
            "replays: publish its files with `ragstream publish` instead",
        )
    keys = [f"github:body:{hashlib.sha256(body).hexdigest()}"]
    delivery = delivery_id(request.headers, GITHUB_DELIVERY)
    if delivery is not None:
        keys.append(f"github:id:{delivery}")
    return await _publish_once(request, plan.requests, keys, "github")


def search_args(query: Any) -> dict[str, Any]:
    """``GET /v1/search``'s query string as :meth:`ops.search.Searcher.search` arguments, or
    ``BadRequest``: an unknown or repeated parameter is refused rather than ignored (a typo
    such as ``urlprefix`` would otherwise widen the search silently)."""
    unknown = sorted(set(query) - set(SEARCH_PARAMS))
    if unknown:
        raise BadRequest(
            f"unknown parameter {unknown[0][:40]!r}; known: {', '.join(SEARCH_PARAMS)}"
        )
    for name in SEARCH_PARAMS:
        if len(query.getall(name, [])) > 1:
            raise BadRequest(f"parameter {name} given more than once")
    q = query.get("q")
    if q is None:
        raise BadRequest("missing parameter q (the query)")
    raw_k = query.get("k", "5")
    if not re.fullmatch(r"[0-9]{1,4}", raw_k):
        raise BadRequest(f"k must be an integer within 1..{MAX_K}, got {raw_k[:20]!r}")
    args: dict[str, Any] = {"query": q, "k": int(raw_k), "mode": query.get("mode", "hybrid")}
    for name in ("weights", "url_prefix", "source", "since"):
        if name in query:
            args[name] = query[name]
    check_query(args["query"], args["k"])
    return args


async def get_search(request: web.Request) -> web.Response:
    """``GET /v1/search``: the same search as ``ragstream search --json`` and
    ``ragstream.Index``, run in a worker thread (encoding blocks) at most
    ``SEARCH_CONCURRENCY`` at a time. 400: bad parameters; 503: Milvus cannot be reached or
    nothing is indexed yet (try later); 500: the model does not fit the collection."""
    args = search_args(request.query)
    searcher = request.app[SEARCHER]
    try:
        async with request.app[SEARCH_SLOTS]:
            result = await asyncio.to_thread(searcher.search, **args)
    except (BadRequest, ValueError) as exc:  # InvalidTime (since) is a ValueError too
        return _json(400, error=str(exc))
    except StoreUnavailable as exc:
        log.warning("503 for a search: %s", exc)
        return _json(503, error=str(exc))
    except ConfigError as exc:
        log.error("search: %s", exc)
        return _json(500, error=str(exc))
    except RagstreamError as exc:  # nothing indexed yet
        return _json(503, error=str(exc))
    except Exception:
        log.exception("search failed")
        return _json(500, error="internal error (logged by the server)")
    return _json(200, **result.as_json())


async def healthz(request: web.Request) -> web.Response:
    return _json(200, alive=True)


async def get_metrics(request: web.Request) -> web.Response:
    """Prometheus text of this process (streams/metrics.py)."""
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


@web.middleware
async def _counted(request: web.Request, handler: Any) -> web.StreamResponse:
    """``ragstream_http_requests_total`` by route (the pattern, never the raw path: a bounded
    label) and status."""
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        info = request.match_info.route.resource
        route = info.canonical if info is not None else "unmatched"
        metrics.HTTP_REQUESTS.labels(route, str(status)).inc()


async def readyz(request: web.Request) -> web.Response:
    problem = await request.app[PUBLISHER].ready()
    if problem is not None:
        return _json(503, ready=False, error=problem)
    return _json(200, ready=True)


def create_app(
    settings: Settings,
    *,
    insecure_no_signature: bool = False,
    search: bool = True,
    searcher: Searcher | None = None,
    advertise: tuple[str, int] | None = None,
) -> web.Application:
    """The aiohttp application; its Kafka producer starts and stops with it.

    With ``search``, ``GET /v1/search`` too, answered by ``searcher`` (default: one made
    from ``settings``, which opens Milvus and loads the model on the first search, so the
    server starts without either). ``advertise`` (host, port): where it listens, recorded
    in ``<home>/run/`` once it does.

    Refuses (``RagstreamError``) when ``webhook_secret`` is empty unless
    ``insecure_no_signature``: an unsigned endpoint lets anyone on the network fill the index.
    """
    if not settings.webhook_secret and not insecure_no_signature:
        raise RagstreamError(
            "RAGSTREAM_WEBHOOK_SECRET is empty: set it (and RAGSTREAM_GITHUB_SECRET if GitHub "
            "uses another one), or pass --insecure-no-signature to accept unsigned requests"
        )
    try:
        normalize_url(raw_url(settings.github_raw_base, "owner/repo", "main", "file"))
    except ValueError as exc:
        raise RagstreamError(f"RAGSTREAM_GITHUB_RAW_BASE: {exc}") from None
    app = web.Application(
        client_max_size=settings.webhook_max_bytes, middlewares=[_counted, _errors_as_json]
    )
    app[SETTINGS] = settings
    app[PUBLISHER] = WebhookPublisher(settings)
    app[INSECURE] = insecure_no_signature
    app.cleanup_ctx.append(_kafka_lifecycle)
    app.router.add_post("/v1/urls", post_urls)
    app.router.add_post("/v1/github", post_github)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/livez", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", get_metrics)
    if advertise is not None:
        host, port = advertise

        async def record(app: web.Application) -> None:
            runfiles.write(settings, "api", host, port)  # for ragstream ps / status

        app.on_startup.append(record)
    if search:
        app[SEARCHER] = searcher or Searcher(settings)
        app[SEARCH_SLOTS] = asyncio.Semaphore(SEARCH_CONCURRENCY)
        app.router.add_get("/v1/search", get_search)
        app.on_cleanup.append(_close_searcher)
    return app


async def _close_searcher(app: web.Application) -> None:
    await asyncio.to_thread(app[SEARCHER].close)


async def _kafka_lifecycle(app: web.Application) -> AsyncIterator[None]:
    publisher = app[PUBLISHER]
    publisher.start_in_background()
    try:
        yield
    finally:
        await publisher.stop()
