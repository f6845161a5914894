"""The webhook server: signed HTTP requests in, ``urls`` messages out, answered after the acks.

Two routes turn outside events into ``urls`` messages: ``POST /v1/urls`` (a generic, signed
list of URLs) and ``POST /v1/github`` (GitHub ``push`` events: changed files become
raw-content URLs, removed files become deletes). A request is answered ``202`` only after
Kafka acknowledged every one of its messages (``acks=all``), so a sender that saw ``202``
may forget the event; anything else (``4xx`` with nothing published, ``503`` with possibly
some published) is safe to resend, because re-ingesting a page is idempotent downstream.

Everything is validated before the first message is produced: a request is published whole
or (on ``4xx``) not at all. The process needs no model and no Milvus; see docs/webhooks.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import re
from collections.abc import AsyncIterator, Iterable
from functools import cache
from typing import Any
from urllib.parse import quote

import orjson
from aiohttp import web
from aiokafka import AIOKafkaProducer

from ragstream.errors import RagstreamError
from streams.ids import normalize_url
from streams.messages import DecodeError, UrlRequest, decode_url, encode_url, utcnow, validator
from streams.settings import Settings
from streams.topics import URLS, ensure_topics

log = logging.getLogger(__name__)

GENERIC_SIGNATURE = "X-Ragstream-Signature-256"
GITHUB_SIGNATURE = "X-Hub-Signature-256"
GITHUB_EVENT = "X-GitHub-Event"

#: Seconds /readyz waits for the broker's metadata before answering 503.
READY_TIMEOUT_S = 3.0
#: First and longest delay between attempts to reach Kafka at startup.
CONNECT_BACKOFF_S = (0.5, 10.0)


class BadRequest(ValueError):
    """The request's content is wrong; the message is sent back to the caller (400)."""


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


# --- POST /v1/urls ----------------------------------------------------------------------

_URLS_KEYS = {"urls", "source", "force"}


@cache
def _url_max_length() -> int:
    return int(validator("urls").schema["properties"]["url"]["maxLength"])


def check_requests(requests: list[UrlRequest], where: list[str]) -> list[UrlRequest]:
    """``requests`` if every one encodes to a schema-valid ``urls`` message, else BadRequest.

    The messages of one request differ only in their URL (and GitHub's path metadata), so
    the first is validated against the schema in full and the others' URLs against the
    schema's length limit: the full check per message costs ~85 us, 2 s for 20,000 URLs.
    """
    limit = _url_max_length()
    for req, name in zip(requests, where, strict=True):
        if len(req.url) > limit:
            raise BadRequest(f"{name}: URL is {len(req.url)} characters; the limit is {limit}")
    if requests:
        try:
            decode_url(encode_url(requests[0]))
        except DecodeError as exc:
            raise BadRequest(f"{where[0]}: {exc}") from None
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
        url = url.strip()
        try:
            normalize_url(url)
        except ValueError as exc:
            raise BadRequest(f"{where}: {exc}") from None
        out.setdefault(url, where)
    now = utcnow()
    requests = [UrlRequest(url=u, source=source, force=force, requested_at=now) for u in out]
    return check_requests(requests, list(out.values()))


# --- POST /v1/github --------------------------------------------------------------------


def split_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


@cache
def glob_regex(pattern: str) -> re.Pattern[str]:
    """A path glob as a regex over the whole repository path (``/``-separated).

    ``*`` and ``?`` stay within one path segment, ``**/`` is any number of directories
    (none included) and a trailing ``**`` is anything: ``**/*`` matches every file,
    ``docs/**/*.md`` matches ``docs/a.md`` and ``docs/x/y/a.md``, ``*.md`` only top-level
    files. ``fnmatch`` cannot say this: its ``*`` crosses ``/`` and ``**/*`` needs a slash.
    """
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : end].replace("\\", "\\\\")
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append(f"(?!/)[{body}]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def path_matches(path: str, globs: Iterable[str]) -> bool:
    return any(glob_regex(g).match(path) for g in globs)


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
    base = settings.github_raw_base.rstrip("/")
    prefix = f"{base}/{quote(repo, safe='/')}/{quote(branch, safe='/')}"
    now = utcnow()
    out = []
    for path, delete in actions.items():
        meta = {"repository": repo, "ref": ref, "commit": after, "path": path}
        req = UrlRequest(
            url=f"{prefix}/{quote(path, safe='/')}",
            source="github",
            requested_at=now,
            delete=delete,
            metadata={k: v for k, v in meta.items() if v is not None},
        )
        out.append(req)
    return PushPlan(check_requests(out, list(actions)))


# --- Kafka ------------------------------------------------------------------------------


class KafkaUnavailable(Exception):
    """The broker did not acknowledge in time (503)."""


class Publisher:
    """One idempotent ``acks=all`` producer for the process's lifetime.

    Connecting happens in the background, retried with backoff, so that the server comes
    up (``/healthz`` 200, ``/readyz`` 503) while Kafka is away, instead of crash-looping.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = settings.topic(URLS)
        self.producer: AIOKafkaProducer | None = None
        self.last_error: str = "not connected yet"
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._connect(), name="webhooks-kafka-connect")

    async def _connect(self) -> None:
        delay, longest = CONNECT_BACKOFF_S
        while True:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.settings.broker,
                acks="all",
                enable_idempotence=True,
                linger_ms=2,
                request_timeout_ms=int(self.settings.webhook_timeout_s * 1000),
            )
            try:
                await ensure_topics(self.settings)
                await producer.start()
            except Exception as exc:  # any failure: retry, report in /readyz
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("Kafka at %s unreachable (%s); retrying", self.settings.broker, exc)
                with contextlib.suppress(Exception):
                    await producer.stop()
                await asyncio.sleep(delay)
                delay = min(delay * 2, longest)
                continue
            self.producer = producer
            log.info("producing to %s on %s", self.topic, self.settings.broker)
            return

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.producer is not None:
            await self.producer.stop()  # flushes what is in flight
            self.producer = None

    async def ready(self) -> str | None:
        """``None`` when the broker answers a metadata request in time, else why not."""
        if self.producer is None:
            return self.last_error
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                await self.producer.client.fetch_all_metadata()
        except Exception as exc:  # whatever the cause, not ready
            return f"broker {self.settings.broker} unreachable: {type(exc).__name__}"
        return None

    async def send_all(self, requests: list[UrlRequest]) -> None:
        """Produce every request (keyed by URL), then wait for all their acks."""
        if self.producer is None:
            raise KafkaUnavailable(f"not connected to Kafka ({self.last_error})")
        try:
            async with asyncio.timeout(self.settings.webhook_timeout_s):
                futures = [
                    await self.producer.send(self.topic, encode_url(r), key=r.key())
                    for r in requests
                ]
                await asyncio.gather(*futures)
        except Exception as exc:
            raise KafkaUnavailable(f"Kafka did not acknowledge: {type(exc).__name__}") from exc


# --- the application --------------------------------------------------------------------

SETTINGS = web.AppKey("settings", Settings)
PUBLISHER = web.AppKey("publisher", Publisher)
INSECURE = web.AppKey("insecure", bool)


def _json(status: int, **body: Any) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


class Rejected(Exception):
    """A request refused before anything was published; answered as ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@web.middleware
async def _errors_as_json(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every refusal as JSON with a message saying what is wrong, never an HTML page."""
    try:
        return await handler(request)
    except Rejected as exc:
        return _json(exc.status, error=str(exc))
    except BadRequest as exc:
        return _json(400, error=str(exc))


async def _read_signed(request: web.Request, secret: str, header: str) -> bytes:
    """The raw body, once its size and signature were checked."""
    limit = request.app[SETTINGS].webhook_max_bytes
    if request.content_length is not None and request.content_length > limit:
        raise Rejected(413, f"body is {request.content_length} bytes; the limit is {limit}")
    try:
        body = await request.read()  # client_max_size caps what is actually read
    except web.HTTPRequestEntityTooLarge:
        raise Rejected(413, f"body is over the limit of {limit} bytes") from None
    given = request.headers.get(header)
    if secret:
        if not given:
            raise Rejected(401, f"missing signature header {header}")
        if not signature_ok(secret, body, given):
            raise Rejected(401, f"wrong signature in {header}")
    elif not request.app[INSECURE]:  # create_app prevents this; never fail open
        raise Rejected(401, "no secret configured")
    return body


async def _publish(request: web.Request, requests: list[UrlRequest]) -> web.Response:
    try:
        await request.app[PUBLISHER].send_all(requests)
    except KafkaUnavailable as exc:
        log.warning("503 for %d message(s): %s", len(requests), exc)
        return _json(503, error=str(exc))
    return _json(202, accepted=len(requests))


async def post_urls(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    body = await _read_signed(request, settings.webhook_secret, GENERIC_SIGNATURE)
    return await _publish(request, plan_urls(parse_json(body)))


async def post_github(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    secret = settings.github_secret or settings.webhook_secret
    body = await _read_signed(request, secret, GITHUB_SIGNATURE)
    event = request.headers.get(GITHUB_EVENT, "")
    if event == "ping":
        return _json(200, pong=True)
    if event != "push":
        return _json(202, ignored=event or f"(no {GITHUB_EVENT} header)")
    if request.content_type == "application/x-www-form-urlencoded":
        raise BadRequest("set the webhook's content type to application/json")
    plan = plan_push(parse_json(body), settings)
    if not plan.requests:
        return _json(202, accepted=0, skipped=plan.skipped or "no matching files")
    return await _publish(request, plan.requests)


async def healthz(request: web.Request) -> web.Response:
    return _json(200, alive=True)


async def readyz(request: web.Request) -> web.Response:
    problem = await request.app[PUBLISHER].ready()
    if problem is not None:
        return _json(503, ready=False, error=problem)
    return _json(200, ready=True)


def create_app(settings: Settings, *, insecure_no_signature: bool = False) -> web.Application:
    """The aiohttp application; its Kafka producer starts and stops with it.

    Refuses (``RagstreamError``) when ``webhook_secret`` is empty unless
    ``insecure_no_signature``: an unsigned endpoint lets anyone on the network fill the index.
    """
    if not settings.webhook_secret and not insecure_no_signature:
        raise RagstreamError(
            "RAGSTREAM_WEBHOOK_SECRET is empty: set it (and RAGSTREAM_GITHUB_SECRET if GitHub "
            "uses another one), or pass --insecure-no-signature to accept unsigned requests"
        )
    try:
        normalize_url(f"{settings.github_raw_base.rstrip('/')}/owner/repo/main/file")
    except ValueError as exc:
        raise RagstreamError(f"RAGSTREAM_GITHUB_RAW_BASE: {exc}") from None
    app = web.Application(client_max_size=settings.webhook_max_bytes, middlewares=[_errors_as_json])
    app[SETTINGS] = settings
    app[PUBLISHER] = Publisher(settings)
    app[INSECURE] = insecure_no_signature
    app.cleanup_ctx.append(_kafka_lifecycle)
    app.router.add_post("/v1/urls", post_urls)
    app.router.add_post("/v1/github", post_github)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def _kafka_lifecycle(app: web.Application) -> AsyncIterator[None]:
    publisher = app[PUBLISHER]
    await publisher.start()
    try:
        yield
    finally:
        await publisher.stop()
