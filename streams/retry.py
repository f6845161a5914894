"""Delayed retries of ``urls`` requests: which failures earn one, when, and which retried
request has been overtaken by a newer one. Pure: the fetch stage and the forwarder in
``agents/retry.py`` own the I/O."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime

HOPS = "ragstream-hops"
"""Kafka header: how many times ``dlq redrive`` sent this message (or its page) back."""
RETRIES = "ragstream-retries"
"""Kafka header on a ``urls`` request: how many delayed retries it has had."""
NOT_BEFORE = "ragstream-not-before"
"""Kafka header on a delay-topic record: epoch milliseconds before which it is not due."""

TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_STATUS = re.compile(r"\bHTTP (\d{3})\b")


def is_transient(exc: BaseException) -> bool:
    """Whether a fetch failure may heal by itself (5xx, timeouts, cut-off bodies).

    The fetcher says so in ``exc.transient`` where it knows; otherwise the error class
    decides: ``fetch`` (transport errors) is transient, ``http_status`` is when its status
    is a server-side or rate-limit one; anything else (other 4xx, too large, forbidden)
    is permanent and goes straight to the dead-letter topic.
    """
    flag = getattr(exc, "transient", None)
    if flag is not None:
        return bool(flag)
    cls = getattr(exc, "error_class", "")
    if cls == "fetch":
        return True
    if cls == "http_status":
        m = _STATUS.search(str(exc))
        return m is not None and int(m[1]) in TRANSIENT_STATUS
    return False


@dataclasses.dataclass(frozen=True, slots=True)
class Retry:
    """Where a failed request goes: delay topic ``n`` (1-based), due at ``not_before_ms``."""

    n: int
    delay_s: float
    not_before_ms: int


def next_retry(retries: int, delays: list[float], now_ms: int) -> Retry | None:
    """The next delayed retry of a request that had ``retries`` of them; None when spent."""
    if retries >= len(delays):
        return None
    delay = delays[retries]
    return Retry(retries + 1, delay, now_ms + int(delay * 1000))


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def superseded(requested_at: str | None, newest_handled: str | None) -> bool:
    """A retried request older than the newest request handled for its page since: the
    page's state already reflects a later wish (a delete, say), so the retry must not undo
    it. Unparseable times never supersede (better a harmless re-fetch than a lost one)."""
    mine, newest = parse_time(requested_at), parse_time(newest_handled)
    return mine is not None and newest is not None and mine < newest


def newest(a: str | None, b: str | None) -> str | None:
    """The later of two request times (either may be missing or unparseable)."""
    ta, tb = parse_time(a), parse_time(b)
    if ta is None:
        return b if tb is not None else a
    if tb is None:
        return a
    return a if ta >= tb else b
