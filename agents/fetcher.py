"""HTTP fetching for the fetch stage: one shared client, bounded concurrency, honest retries.

Transient failures (connect errors, timeouts, 5xx, 429, truncated bodies) are retried with
exponential backoff; ``429``/``503`` with ``Retry-After`` wait what the server asked.
Permanent answers (404/410 mean "gone", other 4xx mean "won't work") are not retried.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import logging
import time
from urllib.parse import urlsplit

import httpx

from streams.settings import Settings

log = logging.getLogger(__name__)

GONE = {404, 410}
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
MAX_RETRY_AFTER_S = 120.0


@dataclasses.dataclass(frozen=True, slots=True)
class Page:
    url: str
    status: int
    body: bytes
    content_type: str | None
    etag: str | None = None
    last_modified: str | None = None
    retry_after: str | None = None

    @property
    def gone(self) -> bool:
        return self.status in GONE

    @property
    def not_modified(self) -> bool:
        return self.status == 304


class FetchFailed(Exception):
    """The page could not be had after ``attempts`` tries; ``error_class`` says why."""

    def __init__(self, error_class: str, message: str, attempts: int) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.attempts = attempts


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return min(max(when - (now if now is not None else time.time()), 0.0), MAX_RETRY_AFTER_S)


class Fetcher:
    """Fetches pages with one keep-alive client, a global and a per-host concurrency cap."""

    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None):
        self.settings = settings
        limits = httpx.Limits(
            max_connections=settings.fetch_concurrency,
            max_keepalive_connections=settings.fetch_concurrency,
        )
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.fetch_timeout_s),
            limits=limits,
            follow_redirects=True,
            headers={"User-Agent": "ragstream/0.1 (+https://github.com/ragstream)"},
            transport=transport,
        )
        self._hosts: dict[str, asyncio.Semaphore] = {}

    def _host_gate(self, url: str) -> asyncio.Semaphore:
        host = urlsplit(url).netloc
        gate = self._hosts.get(host)
        if gate is None:
            gate = self._hosts[host] = asyncio.Semaphore(self.settings.fetch_per_host)
        return gate

    async def fetch(
        self, url: str, etag: str | None = None, last_modified: str | None = None
    ) -> Page:
        """The page, a 304 when validators matched, or a ``gone`` page; else FetchFailed."""
        s = self.settings
        headers = {}
        if etag:
            headers["If-None-Match"] = etag
        if last_modified:
            headers["If-Modified-Since"] = last_modified
        delay = s.fetch_backoff_s
        last_error = ("fetch", "no attempt made")
        for attempt in range(1, s.fetch_attempts + 1):
            wait: float | None = None
            try:
                async with self._host_gate(url):
                    page = await self._get(url, headers)
                if page.status < 400 or page.gone:
                    return page
                if page.status not in RETRY_STATUS:
                    raise FetchFailed("http_status", f"HTTP {page.status} for {url}", attempt)
                last_error = ("http_status", f"HTTP {page.status} for {url}")
                wait = retry_after_s(page.retry_after)
            except httpx.TransportError as exc:  # connect/read errors, timeouts, truncation
                name = type(exc).__name__
                last_error = ("fetch", f"{name}: {exc} ({url})")
            if attempt < s.fetch_attempts:
                await asyncio.sleep(wait if wait is not None else delay)
                delay = min(delay * 2, 30.0)
        raise FetchFailed(last_error[0], last_error[1], s.fetch_attempts)

    async def _get(self, url: str, headers: dict[str, str]) -> Page:
        max_bytes = self.settings.fetch_max_bytes
        async with self.client.stream("GET", url, headers=headers) as resp:
            declared = resp.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise FetchFailed("too_large", f"{url}: {declared} bytes > {max_bytes}", 1)
            chunks = []
            size = 0
            async for part in resp.aiter_bytes():
                size += len(part)
                if size > max_bytes:
                    raise FetchFailed("too_large", f"{url}: body over {max_bytes} bytes", 1)
                chunks.append(part)
            return Page(
                url=str(resp.url),
                status=resp.status_code,
                body=b"".join(chunks),
                content_type=resp.headers.get("content-type"),
                etag=resp.headers.get("etag"),
                last_modified=resp.headers.get("last-modified"),
                retry_after=resp.headers.get("retry-after"),
            )

    async def aclose(self) -> None:
        await self.client.aclose()
