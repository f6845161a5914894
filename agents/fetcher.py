"""HTTP fetching for the fetch stage: guarded, bounded, polite, and honest about failures.

Every URL handed to ragstream is untrusted input, so a fetch is:

- **guarded** (SSRF): only http and https; every hop of a redirect chain (at most
  ``fetch_max_redirects``) is checked, and the connection goes only to an address the
  policy allows (``agents/netguard.py``, ``streams/netpolicy.py``). No proxies from the
  environment (``trust_env=False``): a proxy would connect on our behalf, unchecked.
- **bounded**: the body is decoded here, from the raw bytes, one ``Content-Encoding`` layer
  at most (gzip or deflate, the ones we ask for), and what is counted and capped is the
  decoded size, so 269 bytes on the wire cannot become 64 MiB in memory. One attempt has a
  total deadline (``fetch_deadline_s``, connect to last byte, redirects included); the
  per-read timeout alone lets a server that drips a byte now and then hold a page forever.
- **polite** (``agents/politeness.py``): robots.txt rules and ``Crawl-delay``, a per-host
  concurrency cap, and a per-host rate that halves on 429/503 and grows back on success.
  A 429/503 is the server asking us to wait, not a failure: the page waits (``Retry-After``
  or backoff) without spending an attempt, for up to ``fetch_patience_s`` in all.

Failures are ``FetchFailed`` with an ``error_class`` and a ``transient`` flag. Transient
ones (connect/read errors and timeouts, 5xx, cut-off bodies, robots.txt unreachable,
patience spent) are retried here ``fetch_attempts`` times with exponential backoff, then
raised so the stage can retry them later. Permanent ones are raised at once: the same
request would get the same answer (4xx, ``forbidden_address``, ``too_many_redirects``,
``too_large``, ``unsupported_encoding``, ``robots_disallowed``, ``bad_url``) - and
``deadline``: a page that did not arrive within its whole deadline is most likely a
slow-drip or endless response; retrying it would hold its partition (acks go in offset
order) for several more deadlines, so it goes to the dead-letter topic, from which it can
be redriven by hand.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import logging
import time
import zlib
from urllib.parse import urldefrag, urljoin, urlsplit, urlunsplit

import httpx

from agents.netguard import GuardedTransport, Resolver
from agents.politeness import (
    ROBOTS_MAX_BYTES,
    HostKey,
    HostState,
    Politeness,
    Robots,
    host_key,
    origin,
)
from streams import metrics
from streams.errors import FetchFailed, ForbiddenAddress
from streams.github import raw_auth_headers
from streams.netpolicy import FILE_SCHEME, parse_host_address
from streams.settings import Settings

log = logging.getLogger(__name__)

USER_AGENT = "ragstream/0.1 (+https://github.com/ragstream)"
ACCEPT_ENCODING = "gzip, deflate"
GONE = {404, 410}
REDIRECTS = {301, 302, 303, 307, 308}
SLOW_DOWN = {429, 503}
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
MAX_BACKOFF_S = 30.0
GZIP_MAGIC = b"\x1f\x8b"


@dataclasses.dataclass(frozen=True, slots=True)
class Page:
    url: str
    status: int
    body: bytes
    content_type: str | None
    etag: str | None = None
    last_modified: str | None = None
    retry_after: str | None = None
    location: str | None = None

    @property
    def gone(self) -> bool:
        return self.status in GONE

    @property
    def not_modified(self) -> bool:
        return self.status == 304


def retry_after_s(
    value: str | None, now: float | None = None, cap: float | None = None
) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        wait = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        wait = max(when - (now if now is not None else time.time()), 0.0)
    return wait if cap is None else min(wait, cap)


class BodyReader:
    """Undoes one ``Content-Encoding`` layer incrementally and caps the *decoded* size.

    zlib's ``max_length`` keeps each step to the room left (+1 byte to notice overflow),
    so a compression bomb never expands past the cap. With ``truncate`` the body is cut at
    the cap instead (robots.txt: the first 512 KiB are what counts).
    """

    def __init__(
        self, url: str, content_encoding: str | None, max_bytes: int, truncate: bool = False
    ) -> None:
        self.url = url
        self.max_bytes = max_bytes
        self.truncate = truncate
        codings = [c.strip().lower() for c in (content_encoding or "").split(",")]
        codings = [c for c in codings if c and c != "identity"]
        if len(codings) > 1:
            raise FetchFailed(
                "unsupported_encoding",
                f"{url}: stacked Content-Encoding {content_encoding!r} (one layer at most)",
            )
        self.coding = codings[0] if codings else None
        if self.coding not in (None, "gzip", "x-gzip", "deflate"):
            raise FetchFailed(
                "unsupported_encoding", f"{url}: Content-Encoding {self.coding!r} not supported"
            )
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS) if self._gzip else None
        self._held = b""  # deflate's first bytes (which flavour?) or bytes after a gzip member
        self._parts: list[bytes] = []
        self.size = 0
        self.full = False

    @property
    def _gzip(self) -> bool:
        return self.coding in ("gzip", "x-gzip")

    def feed(self, data: bytes) -> bool:
        """Take raw bytes; False once the body is full (truncating): stop reading."""
        if self.full:
            return False
        if self.coding is None:
            self._keep(data)
        else:
            self._inflate(data)
        return not self.full

    def _keep(self, out: bytes) -> None:
        room = self.max_bytes - self.size
        if len(out) > room:
            if not self.truncate:
                raise FetchFailed(
                    "too_large", f"{self.url}: body over {self.max_bytes} bytes (decoded)"
                )
            out, self.full = out[:room], True
        self._parts.append(out)
        self.size += len(out)

    def _inflate(self, data: bytes) -> None:
        if self._z is None or self._z.eof:
            data = self._held + data
            self._held = b""
            if len(data) < 2:
                self._held = data
                return
            if self._z is None:  # deflate: zlib-wrapped (RFC 9110) or raw, as servers send
                cmf, flg = data[0], data[1]
                zlib_wrapped = cmf & 0x0F == 8 and (cmf * 256 + flg) % 31 == 0
                self._z = zlib.decompressobj(zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS)
            elif data.startswith(GZIP_MAGIC):  # the next member of a multi-member gzip
                self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
            else:
                return  # bytes after the end of the compressed stream: ignored
        while data and not self.full:
            try:
                out = self._z.decompress(data, self.max_bytes - self.size + 1)
            except zlib.error as exc:
                raise FetchFailed(
                    "unsupported_encoding", f"{self.url}: broken {self.coding} data ({exc})"
                ) from None
            self._keep(out)
            data = self._z.unconsumed_tail
            if self._z.eof:
                rest = self._z.unused_data
                if rest and self._gzip:
                    self._inflate(rest)
                return

    def finish(self) -> bytes:
        """The decoded body; a compressed stream that stopped short is a cut-off body."""
        if self.coding is not None and not self.full:
            if self._z is None and self._held:
                raise FetchFailed("unsupported_encoding", f"{self.url}: broken {self.coding} data")
            if self._z is not None and not self._z.eof:
                raise FetchFailed("fetch", f"{self.url}: compressed body cut off", transient=True)
        return b"".join(self._parts)


LOCATION = "x-ragstream-location"


class _KeepLocation(httpx.AsyncBaseTransport):
    """Hands the fetcher each response's raw stream, and ``Location`` under another name.

    httpx parses ``Location`` into its next request even when not following redirects, and
    fails (a transient-looking protocol error) on spellings such as ``0177.0.0.1`` that the
    fetcher must judge, and refuse, itself. And a response a test's ``MockTransport`` built
    from ``content=`` was already read (and decoded) by httpx: rebuilt on its stream, it is
    raw bytes again, as from the network.
    """

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        resp = await self.inner.handle_async_request(request)
        raw = [
            (LOCATION.encode() if k.lower() == b"location" else k, v) for k, v in resp.headers.raw
        ]
        return httpx.Response(
            resp.status_code, headers=raw, stream=resp.stream, extensions=resp.extensions
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


class Fetcher:
    """Fetches pages with one keep-alive client, a global and a per-host concurrency cap.

    ``transport`` is for tests: an ``httpx.MockTransport`` answers instead of the network.
    It replaces the ``GuardedTransport``, so what only the socket layer checks (the
    addresses a host name resolves to) is not checked; everything above it still runs:
    scheme and literal-address checks on every redirect hop, robots.txt, politeness,
    retries, size caps, deadlines. Without one, every connection goes through the guard.
    """

    def __init__(
        self,
        settings: Settings,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        resolver: Resolver | None = None,
    ) -> None:
        self.settings = settings
        limits = httpx.Limits(
            max_connections=settings.fetch_concurrency,
            max_keepalive_connections=settings.fetch_concurrency,
        )
        if transport is None:
            transport = GuardedTransport(settings.fetch_policy, limits=limits, resolver=resolver)
        self.policy = settings.fetch_policy
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.fetch_timeout_s),
            follow_redirects=False,  # followed below, each hop checked
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": ACCEPT_ENCODING},
            transport=_KeepLocation(transport),
            trust_env=False,
        )
        self.politeness = Politeness(
            settings.fetch_per_host,
            settings.fetch_host_rate,
            settings.fetch_host_rate_max,
            settings.fetch_max_hosts,
        )

    async def fetch(
        self, url: str, etag: str | None = None, last_modified: str | None = None
    ) -> Page:
        """The page, a 304 when validators matched, or a ``gone`` page; else FetchFailed.
        A ``file://`` URL is read from disk (``agents/filereader.py``)."""
        if urlsplit(url).scheme.lower() == FILE_SCHEME:
            return await self._read_local(url, etag)
        headers = {}
        if etag:
            headers["If-None-Match"] = etag
        if last_modified:
            headers["If-Modified-Since"] = last_modified
        s = self.settings
        return await self._fetch(url, headers, s.fetch_max_bytes, robots=s.fetch_robots)

    async def _read_local(self, url: str, etag: str | None) -> Page:
        """A local file in a thread, within the fetch deadline; no robots, no politeness."""
        from agents.filereader import read_local  # it builds Pages: imported once used

        s = self.settings
        try:
            async with asyncio.timeout(s.fetch_deadline_s):
                return await asyncio.to_thread(
                    read_local, url, self.policy, s.fetch_max_bytes, etag
                )
        except TimeoutError:
            raise FetchFailed(
                "deadline", f"{url}: not read within {s.fetch_deadline_s:g}s (fetch_deadline_s)"
            ) from None

    async def _fetch(
        self,
        url: str,
        headers: dict[str, str],
        max_bytes: int,
        *,
        robots: bool,
        truncate: bool = False,
    ) -> Page:
        """Attempts with backoff; 429/503 waits that spend no attempt, within patience."""
        s = self.settings
        delay = s.fetch_backoff_s
        slow_delay = s.fetch_backoff_s
        patience = s.fetch_patience_s
        last = FetchFailed("fetch", "no attempt made", 0, transient=True)
        attempt = 0
        while attempt < s.fetch_attempts:
            attempt += 1
            try:
                page = await self._chain(url, headers, max_bytes, robots, truncate)
            except FetchFailed as exc:
                exc.attempts = attempt
                if not exc.transient:
                    raise
                last = exc
            except ForbiddenAddress as exc:
                raise FetchFailed("forbidden_address", f"{url}: {exc}", attempt) from None
            except httpx.InvalidURL as exc:
                raise FetchFailed("bad_url", f"{url}: {exc}", attempt) from None
            except httpx.TransportError as exc:  # connect/read errors, timeouts, cut-off bodies
                name = type(exc).__name__
                last = FetchFailed("fetch", f"{name}: {exc} ({url})", attempt, transient=True)
            else:
                if page.status < 400 or page.gone:
                    return page
                message = f"HTTP {page.status} for {page.url}"
                if page.status in SLOW_DOWN:
                    asked = retry_after_s(page.retry_after)
                    wait = max(asked if asked is not None else slow_delay, s.fetch_backoff_s)
                    if wait <= patience:  # the server asks us to wait: not an attempt
                        patience -= wait
                        attempt -= 1
                        if asked is None:
                            slow_delay = min(slow_delay * 2, MAX_BACKOFF_S)
                        log.info("%s; waiting %.1fs (patience left %.0fs)", message, wait, patience)
                        await asyncio.sleep(wait)
                        continue
                    message += f" (waited {s.fetch_patience_s:.0f}s of patience)"
                if page.status not in RETRY_STATUS:
                    raise FetchFailed("http_status", message, attempt, status=page.status)
                last = FetchFailed(
                    "http_status", message, attempt, transient=True, status=page.status
                )
            if attempt < s.fetch_attempts:
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
        last.attempts = s.fetch_attempts
        raise last

    def _checked_url(self, url: str) -> str:
        """The URL if its scheme and any literal address pass, with an odd IPv4 spelling
        (``2130706433``, ``0177.0.0.1``) written the usual way, as browsers do."""
        refusal = self.policy.url_refusal(url)
        if refusal is not None:
            raise FetchFailed("forbidden_address", f"{url}: {refusal}")
        parts = urlsplit(url)
        try:
            host, port = parts.hostname or "", parts.port
        except ValueError as exc:
            raise FetchFailed("bad_url", f"{url}: {exc}") from None
        addr = parse_host_address(host)
        if addr is not None and addr.version == 4 and str(addr) != host:
            netloc = str(addr) if port is None else f"{addr}:{port}"
            if "@" in parts.netloc:
                netloc = parts.netloc.rsplit("@", 1)[0] + "@" + netloc
            url = urlunsplit(parts._replace(netloc=netloc))
        try:
            httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise FetchFailed("bad_url", f"{url}: {exc}") from None
        return url

    async def _chain(
        self, url: str, headers: dict[str, str], max_bytes: int, robots: bool, truncate: bool
    ) -> Page:
        """One attempt: the redirect chain, each hop checked, within one deadline."""
        s = self.settings
        budget = s.fetch_deadline_s
        current = url
        for hop in range(s.fetch_max_redirects + 1):
            try:
                current = self._checked_url(current)
            except FetchFailed as exc:
                if hop:
                    exc.args = (f"{url} redirects to {exc}",)
                raise
            key = host_key(current)
            async with self.politeness.use(key) as state:
                if robots:
                    await self._check_robots(current, key, state)
                async with self.politeness.turn(state):
                    started = time.monotonic()
                    deadline = asyncio.timeout(budget)
                    try:
                        async with deadline:
                            page = await self._get(current, headers, max_bytes, truncate)
                    except TimeoutError:
                        if not deadline.expired():
                            raise
                        raise FetchFailed(
                            "deadline",
                            f"{url}: not complete within {s.fetch_deadline_s:g}s "
                            "(fetch_deadline_s)",
                        ) from None
                    finally:
                        budget -= time.monotonic() - started
                if page.status in SLOW_DOWN:
                    pause = retry_after_s(page.retry_after, cap=s.fetch_patience_s)
                    state.rate.slow_down(pause)
                elif page.status < 500:
                    state.rate.success()
            if page.status not in REDIRECTS:
                return page
            if not page.location:
                raise FetchFailed("http_status", f"HTTP {page.status} without a Location: {url}")
            current = urldefrag(urljoin(current, page.location.strip()))[0]
        raise FetchFailed(
            "too_many_redirects", f"{url}: more than {s.fetch_max_redirects} redirects"
        )

    async def _get(self, url: str, headers: dict[str, str], max_bytes: int, truncate: bool) -> Page:
        """One HTTP request, timed and counted for ``/metrics`` whatever its outcome."""
        t0 = time.perf_counter()
        status: int | None = None
        try:
            page = await self._request(url, headers, max_bytes, truncate)
            status = page.status
            return page
        finally:
            metrics.FETCH_SECONDS.labels(metrics.status_class(status)).observe(
                time.perf_counter() - t0
            )
            metrics.FETCH_REQUESTS.labels(metrics.host_label(urlsplit(url).hostname or "")).inc()

    async def _request(
        self, url: str, headers: dict[str, str], max_bytes: int, truncate: bool
    ) -> Page:
        # a private repository's raw files need the token: sent to that host alone, per hop
        s = self.settings
        headers = {**headers, **raw_auth_headers(url, s.github_raw_base, s.github_token)}
        async with self.client.stream("GET", url, headers=headers) as resp:
            status = resp.status_code
            body = b""
            if 200 <= status < 300 or (300 <= status < 400 and status not in REDIRECTS | {304}):
                declared = resp.headers.get("content-length", "")
                if not truncate and declared.isdigit() and int(declared) > max_bytes:
                    raise FetchFailed("too_large", f"{url}: {declared} bytes > {max_bytes}")
                reader = BodyReader(url, resp.headers.get("content-encoding"), max_bytes, truncate)
                async for raw in resp.aiter_raw():
                    if not reader.feed(raw):
                        break
                body = reader.finish()
            return Page(
                url=url,
                status=status,
                body=body,
                content_type=resp.headers.get("content-type"),
                etag=resp.headers.get("etag"),
                last_modified=resp.headers.get("last-modified"),
                retry_after=resp.headers.get("retry-after"),
                location=resp.headers.get(LOCATION),
            )

    async def _check_robots(self, url: str, key: HostKey, state: HostState) -> None:
        ttl = self.settings.fetch_robots_ttl_s
        rules = state.robots
        if rules is None or time.monotonic() - rules.fetched_at > ttl:
            async with state.robots_lock:  # one read per host, the others wait for it
                rules = state.robots
                if rules is None or time.monotonic() - rules.fetched_at > ttl:
                    rules = await self._read_robots(key)
                    state.set_robots(rules)
        if not rules.allows(url):
            raise FetchFailed("robots_disallowed", f"{url}: disallowed by {origin(key)}/robots.txt")

    async def _read_robots(self, key: HostKey) -> Robots:
        """RFC 9309: 2xx rules apply; 4xx means no rules. Unreachable (5xx, network errors,
        after the usual attempts) means "do not crawl yet": the page fails *transiently*
        (``robots_unavailable``) and is retried later, rather than fetched against rules we
        could not read or dead-lettered for a glitch. An unreadable file (redirect loop,
        broken encoding, deadline) counts as no rules."""
        url = f"{origin(key)}/robots.txt"
        try:
            page = await self._fetch(url, {}, ROBOTS_MAX_BYTES, robots=False, truncate=True)
        except FetchFailed as exc:
            if exc.error_class == "forbidden_address":
                raise
            if exc.transient:
                raise FetchFailed(
                    "robots_unavailable", f"{url}: {exc}", transient=True, status=exc.status
                ) from None
            log.info("robots.txt unreadable, no rules applied: %s", exc)
            return Robots.allow_all(time.monotonic())
        if 200 <= page.status < 300:
            return Robots(page.body.decode("utf-8", "replace"), time.monotonic())
        return Robots.allow_all(time.monotonic())

    async def aclose(self) -> None:
        await self.client.aclose()
