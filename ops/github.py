"""``ragstream publish --github OWNER/REPO``: a repository's files listed through the GitHub
REST API, as ``urls`` messages for their raw-content URLs.

The listing is one consistent snapshot: the ref (``--ref``, else the repository's default
branch) is resolved to a commit once, and that commit's tree is listed, so a push during a
long listing cannot mix two versions. The URLs name the ref as given, not the commit: a URL
is its page's identity, so a later ingestion (or a push through the webhook, which uses the
same rules from ``streams/github.py``) replaces these pages' chunks instead of adding a
second copy. The commit is recorded in each message's ``metadata``.

``GET /git/trees/{sha}?recursive=1`` lists a whole tree in one request, but GitHub cuts it
(``truncated``) past 100,000 entries or 7 MB; then that directory is read alone and its
subdirectories recursively again, so no file is lost. A directory too large for one answer
is an error, never a silently partial listing.

Rate limits are waited out, never answered by dropping files: the rules are pure
(:func:`streams.github.rate_limit_wait`, :func:`streams.github.pace_s`), the waiting is
here, bounded in all by ``github_max_wait_s`` (then ``Unavailable``, and nothing was
published). The token (``GITHUB_TOKEN``) goes in the ``Authorization`` header of API
requests only; httpx drops it on a redirect to another host, and it is never logged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import httpx

from ops.webhooks import check_url
from streams.errors import BadRequest, ConfigError, Unavailable
from streams.github import (
    Wait,
    file_request,
    pace_s,
    path_matches,
    quote_path,
    rate_headers,
    rate_limit_wait,
    read_tree,
    split_list,
)
from streams.messages import UrlRequest, utcnow
from streams.settings import Settings

log = logging.getLogger(__name__)

USER_AGENT = "ragstream/0.1 (+https://github.com/ragstream)"
#: Tries of one request that met a connection error or a 5xx before it is ``Unavailable``.
ATTEMPTS = 5
#: The first pause after a connection error or a 5xx (doubled each time).
RETRY_S = 1.0
#: While waiting out a rate limit, a progress message at least this often.
PROGRESS_EVERY_S = 60.0

Say = Callable[[str], None]
Sleep = Callable[[float], Awaitable[None]]


def _quiet(_message: str) -> None:
    return None


def clock_time(unix_s: float) -> str:
    """``HH:MM:SS`` in local time: when a wait ends, as a person reads it."""
    return datetime.fromtimestamp(unix_s).strftime("%H:%M:%S")


class GitHubApi:
    """GET requests to the REST API that wait out rate limits within one budget.

    ``transport``, ``sleep`` and ``clock`` are for tests (a fake server still answers over
    HTTP; the sleep can be recorded). ``say`` receives progress messages.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.time,
        say: Say = _quiet,
    ) -> None:
        self.settings = settings
        headers = {
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": "2022-11-28",
            "User-Agent": USER_AGENT,
        }
        if settings.github_token:
            headers["Authorization"] = f"Bearer {settings.github_token}"
        self.client = httpx.AsyncClient(
            base_url=settings.github_api.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(30.0),
            follow_redirects=True,  # a renamed repository answers 301
            transport=transport,
            trust_env=False,
        )
        self.sleep = sleep
        self.clock = clock
        self.say = say
        self.requests = 0
        self.waited_s = 0.0

    async def __aenter__(self) -> GitHubApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()

    async def get(self, path: str, params: dict[str, str] | None = None) -> Any:
        """The JSON answer of ``GET path``, after any waits GitHub asked for."""
        backoff = self.settings.github_backoff_s
        retry = RETRY_S
        failures = 0
        while True:
            self.requests += 1
            try:
                resp = await self.client.get(path, params=params)
            except httpx.TransportError as exc:
                failures += 1
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code < 300:
                    await self._pace(resp.headers)
                    try:
                        return resp.json()
                    except ValueError:
                        raise ConfigError(
                            f"{self.settings.github_api}{path} did not answer JSON "
                            "(is RAGSTREAM_GITHUB_API the REST API base?)"
                        ) from None
                wait = rate_limit_wait(
                    resp.status_code, resp.headers, resp.text, self.clock(), backoff
                )
                if wait is not None:
                    if wait.kind == "secondary" and rate_headers(resp.headers).retry_after is None:
                        backoff *= 2
                    await self._wait(wait)
                    continue
                if resp.status_code < 500:
                    raise _refusal(resp, path, self.settings)
                failures += 1
                problem = f"HTTP {resp.status_code}"
            if failures >= ATTEMPTS:
                raise Unavailable(
                    f"GitHub API {self.settings.github_api}: {problem} for {path}, "
                    f"{ATTEMPTS} times; nothing was published"
                )
            log.info("GitHub %s for %s; retrying in %.0fs", problem, path, retry)
            await self.sleep(retry)  # bounded by ATTEMPTS, not part of the rate-limit budget
            retry *= 2

    async def _wait(self, wait: Wait) -> None:
        """Sleep ``wait.seconds``, or ``Unavailable`` when that would pass the budget."""
        limit = self.settings.github_max_wait_s
        if self.waited_s + wait.seconds > limit:
            raise Unavailable(
                f"GitHub {wait.kind} rate limit: waiting {wait.seconds:.0f}s more would pass "
                f"RAGSTREAM_GITHUB_MAX_WAIT_S ({limit:g}s; {self.waited_s:.0f}s waited "
                "already); nothing was published, run again later or raise the limit"
            )
        self.waited_s += wait.seconds
        until = self.clock() + wait.seconds
        self.say(
            f"GitHub {wait.kind} rate limit: waiting {wait.seconds:.0f}s, until {clock_time(until)}"
        )
        left = wait.seconds
        while left > 0:
            step = min(left, PROGRESS_EVERY_S)
            await self.sleep(step)
            left -= step
            if left > 0:
                self.say(f"  still waiting for the GitHub rate limit: {left:.0f}s left")

    async def _pace(self, headers: httpx.Headers) -> None:
        """Space requests out when few remain (within what is left of the wait budget)."""
        pause = pace_s(rate_headers(headers), self.clock(), self.settings.github_pace_below)
        pause = min(pause, max(self.settings.github_max_wait_s - self.waited_s, 0.0))
        if pause > 0:
            log.info("few GitHub API requests left: pausing %.1fs", pause)
            self.waited_s += pause
            await self.sleep(pause)


def _refusal(resp: httpx.Response, path: str, settings: Settings) -> ConfigError:
    """A 4xx that waiting will not change, as an error that says what to fix."""
    try:
        message = str(resp.json().get("message", ""))[:200]
    except (ValueError, AttributeError):
        message = resp.text[:200]
    status = resp.status_code
    hint = ""
    if status == 401:
        hint = ": check GITHUB_TOKEN"
    elif status in (403, 404):
        hint = (
            ": does it exist? A private repository needs GITHUB_TOKEN with read access"
            if status == 404
            else ": the token lacks permission"
        )
    return ConfigError(f"GitHub answered {status} ({message}) for {path}{hint}")


@dataclasses.dataclass(frozen=True, slots=True)
class Listing:
    """A repository's matching files at one commit."""

    repo: str
    ref: str  # as the URLs name it: the branch, tag or sha given, or the default branch
    commit: str
    files: list[str]  # matching blob paths, sorted
    blobs: int  # every blob seen, matching or not
    requests: int  # API requests made, refused ones included
    waited_s: float


async def resolve(api: GitHubApi, repo: str, ref: str | None) -> tuple[str, str, str]:
    """``(ref, commit sha, tree sha)``: the default branch when ``ref`` is None, then the
    commit the ref names now (``/commits/{ref}`` takes a branch, a tag or a sha)."""
    if ref is None:
        info = await api.get(f"/repos/{repo}")
        ref = info.get("default_branch") if isinstance(info, dict) else None
        if not isinstance(ref, str) or not ref:
            raise ConfigError(f"GitHub did not name {repo}'s default branch: give --ref")
    commit = await api.get(f"/repos/{repo}/commits/{quote_path(ref)}")
    try:
        return ref, str(commit["sha"]), str(commit["commit"]["tree"]["sha"])
    except (KeyError, TypeError):
        raise ConfigError(f"GitHub's answer for {repo}@{ref} names no commit") from None


async def list_tree(api: GitHubApi, repo: str, tree: str) -> list[str]:
    """Every blob path of ``tree``: one recursive request where GitHub answers it whole.

    A truncated answer is thrown away (which part is missing is not said) and that
    directory read alone, then each of its subdirectories recursively again: a large
    repository costs about two requests per directory that is too large, not one per
    directory."""
    files: list[str] = []
    todo = [("", tree)]
    while todo:
        prefix, sha = todo.pop()
        path = f"/repos/{repo}/git/trees/{sha}"
        page = read_tree(await api.get(path, {"recursive": "1"}), prefix)
        if not page.truncated:
            files.extend(page.files)
            continue
        api.say(f"GitHub truncated the tree of {prefix or '/'}: listing it by directory")
        page = read_tree(await api.get(path), prefix)
        if page.truncated:
            raise ConfigError(
                f"{repo}: directory {prefix or '/'} has more entries than GitHub returns in "
                "one answer; it cannot be listed whole"
            )
        files.extend(page.files)
        todo.extend((f"{sub_path}/", sub) for sub_path, sub in page.subtrees)
    return files


async def list_repo(
    settings: Settings,
    repo: str,
    ref: str | None = None,
    globs: list[str] | None = None,
    *,
    say: Say = _quiet,
    transport: httpx.AsyncBaseTransport | None = None,
    sleep: Sleep = asyncio.sleep,
) -> Listing:
    """The files of ``repo`` at ``ref`` matching ``globs`` (default ``github_globs``)."""
    patterns = globs or split_list(settings.github_globs)
    async with GitHubApi(settings, transport=transport, sleep=sleep, say=say) as api:
        name, commit, tree = await resolve(api, repo, ref)
        say(f"listing {repo}@{name} (commit {commit[:12]})")
        paths = await list_tree(api, repo, tree)
        files = sorted(p for p in paths if path_matches(p, patterns))
        return Listing(repo, name, commit, files, len(paths), api.requests, api.waited_s)


def listing_requests(
    settings: Settings,
    listing: Listing,
    *,
    force: bool = False,
    delete: bool = False,
    say: Say = _quiet,
) -> list[UrlRequest]:
    """The ``urls`` messages of a listing; a file whose URL is not acceptable (too long)
    is named and left out."""
    now = utcnow()
    out = []
    for path in listing.files:
        req = file_request(
            settings.github_raw_base,
            listing.repo,
            listing.ref,
            path,
            commit=listing.commit,
            requested_at=now,
        )
        try:
            check_url(req.url, path)
        except BadRequest as exc:
            say(f"skipped: {exc}")
            continue
        out.append(dataclasses.replace(req, force=force, delete=delete))
    return out
