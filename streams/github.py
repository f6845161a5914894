"""GitHub's rules, pure: which files, their raw URLs, and how long GitHub asks us to wait.

One module for what the push webhook (``ops/webhooks.py``) and ``ragstream publish
--github`` (``ops/github.py``) must agree on, so that a file published by either has the
same URL, and so the same page identity (``doc_id``): a push that changes a file replaces
the chunks a full ingestion made, and a removal finds them. The fetch stage reads
:func:`raw_auth_headers` from here too, so the token goes to the configured raw host only.

Rate limits follow GitHub's documentation ("Rate limits for the REST API", "Best practices
for using the REST API"): a 403 or 429 with ``X-RateLimit-Remaining: 0`` is the primary
limit (wait until ``X-RateLimit-Reset``); with ``Retry-After`` it is a secondary limit (wait
that long); a 429, or a 403 saying "rate limit", without either header is a secondary limit
too (wait at least a minute, doubling each time). No I/O here: ``ops/github.py`` does it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any
from urllib.parse import quote, urlsplit

from streams.errors import ConfigError
from streams.messages import UrlRequest, utcnow

#: Time added to a primary limit's reset: GitHub's clock and ours differ by a second or so,
#: and a request sent at the reset second itself may still be refused.
RESET_SLACK_S = 1.0
#: The longest one exponential-backoff step (secondary limits without headers).
MAX_BACKOFF_S = 15 * 60.0


def split_list(value: str) -> list[str]:
    """A comma-separated setting (``github_globs``, ``github_branches``) as its items."""
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


# --- repositories and raw URLs ----------------------------------------------------------------

_REPO = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})/[A-Za-z0-9._-]{1,100}\Z")


def parse_repo(value: str) -> str:
    """``OWNER/REPO`` as given, or ``ConfigError`` saying the form (a URL is a common slip)."""
    repo = value.strip().removesuffix(".git")
    if not _REPO.match(repo) or repo.split("/")[1] in (".", ".."):
        raise ConfigError(f"--github wants OWNER/REPO (e.g. django/django), got {value!r}")
    return repo


def quote_path(path: str) -> str:
    """A repository path (or ref, or ``owner/repo``) as it goes into a URL: each segment
    percent-encoded, the slashes kept."""
    return quote(path, safe="/")


def raw_url(raw_base: str, repo: str, ref: str, path: str) -> str:
    """The raw-content URL of ``path`` at ``ref``: ``<raw_base>/<owner>/<repo>/<ref>/<path>``.

    The ref is a branch name when one is ingested, not its commit: the URL is the page's
    identity, and it must not change when the branch moves (see ``plan_push``)."""
    base = raw_base.rstrip("/")
    return f"{base}/{quote_path(repo)}/{quote_path(ref)}/{quote_path(path)}"


def file_request(
    raw_base: str,
    repo: str,
    ref: str,
    path: str,
    *,
    commit: str | None = None,
    full_ref: str | None = None,
    delete: bool = False,
    requested_at: str | None = None,
) -> UrlRequest:
    """The ``urls`` message for one repository file: the same for a push and a listing."""
    meta = {"repository": repo, "ref": full_ref or ref, "commit": commit, "path": path}
    return UrlRequest(
        url=raw_url(raw_base, repo, ref, path),
        source="github",
        requested_at=requested_at or utcnow(),
        delete=delete,
        metadata={k: v for k, v in meta.items() if v is not None},
    )


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    return parts.scheme.lower(), (parts.hostname or "").lower(), port or default


def raw_auth_headers(url: str, raw_base: str, token: str) -> dict[str, str]:
    """``Authorization`` for a fetch of ``url`` when it lies under ``raw_base`` (same scheme,
    host and port, path below the base's) and a token is set; otherwise nothing.

    Private repositories' raw files need the token. Sending it to any other URL would hand
    it to whoever a page (or a redirect: each hop is asked separately) points at.
    """
    if not token or not raw_base:
        return {}
    base_path = urlsplit(raw_base).path.rstrip("/") + "/"
    if _origin(url) != _origin(raw_base) or not urlsplit(url).path.startswith(base_path):
        return {}
    return {"Authorization": f"token {token}"}


# --- trees --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class TreePage:
    """One answer of ``GET /repos/{o}/{r}/git/trees/{sha}``, relative to ``prefix``."""

    files: list[str]  # blob paths, full (prefix included)
    subtrees: list[tuple[str, str]]  # (full path, tree sha)
    truncated: bool


def read_tree(payload: Any, prefix: str = "") -> TreePage:
    """Blobs and subtrees of a trees answer. Submodules (``commit``) and symlinks (mode
    ``120000``: their raw content is the link's target path) are not files to ingest."""
    if not isinstance(payload, dict) or not isinstance(payload.get("tree"), list):
        raise ConfigError("GitHub answered a trees request without a tree (is this the API?)")
    files: list[str] = []
    subtrees: list[tuple[str, str]] = []
    for entry in payload["tree"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            continue
        path = f"{prefix}{entry['path']}"
        if entry.get("type") == "blob" and entry.get("mode") != "120000":
            files.append(path)
        elif entry.get("type") == "tree" and isinstance(entry.get("sha"), str):
            subtrees.append((path, entry["sha"]))
    return TreePage(files, subtrees, bool(payload.get("truncated")))


# --- rate limits ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class RateHeaders:
    """What an answer says about the rate limit; ``None`` where it says nothing."""

    remaining: int | None = None
    reset: float | None = None  # unix seconds
    retry_after: float | None = None  # seconds


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if number >= 0 and number == number else None  # not negative, not NaN


def rate_headers(headers: Mapping[str, str]) -> RateHeaders:
    """The rate-limit headers of an answer (names case-insensitive; junk is ignored)."""
    lower = {k.lower(): v for k, v in headers.items()}
    remaining = _number(lower.get("x-ratelimit-remaining"))
    return RateHeaders(
        remaining=int(remaining) if remaining is not None else None,
        reset=_number(lower.get("x-ratelimit-reset")),
        retry_after=_number(lower.get("retry-after")),
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Wait:
    """GitHub asked us to wait ``seconds``; ``kind`` is ``primary`` or ``secondary``."""

    seconds: float
    kind: str


def rate_limit_wait(
    status: int, headers: Mapping[str, str], body: str, now: float, backoff_s: float
) -> Wait | None:
    """How long to wait before sending a refused request again, or ``None`` when the answer
    is not a rate limit (a 403 for missing permission is an error, not a reason to wait).

    ``backoff_s`` is this request's exponential-backoff step, used only when GitHub names no
    time; the caller doubles it after each such wait.
    """
    if status not in (403, 429):
        return None
    rate = rate_headers(headers)
    if rate.retry_after is not None:
        return Wait(rate.retry_after, "secondary")
    if rate.remaining == 0 and rate.reset is not None:
        return Wait(max(rate.reset - now, 0.0) + RESET_SLACK_S, "primary")
    if status == 429 or "rate limit" in body.lower():
        return Wait(min(backoff_s, MAX_BACKOFF_S), "secondary")
    return None


def pace_s(rate: RateHeaders, now: float, below: int) -> float:
    """A pause before the next request when few remain: the time to the reset shared out
    over the requests left, so a long listing slows down instead of running into the wall
    (and a refusal that would make a secondary limit more likely). 0 when ``below`` is 0."""
    if below <= 0 or rate.remaining is None or rate.reset is None or rate.remaining >= below:
        return 0.0
    return max(rate.reset - now, 0.0) / (rate.remaining + 1)
