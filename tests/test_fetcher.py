"""The Fetcher without Kafka: retries, waits, bounds, redirects, robots.txt, the SSRF guard.

Most tests drive it through ``httpx.MockTransport``; the ones about sockets (slow drip, cut-off
bodies, what is connected to) use local servers on 127.0.0.1 or a fake resolver and a fake
network backend, so no packet goes anywhere but loopback.
"""

from __future__ import annotations

import asyncio
import gzip
import time
import tracemalloc
import zlib
from collections.abc import Callable

import httpcore
import httpx
import pytest

from agents.fetcher import BodyReader, Fetcher, retry_after_s
from agents.netguard import GuardedBackend
from agents.politeness import HostRate, Politeness, Robots, host_key
from streams.errors import FetchFailed, ForbiddenAddress
from streams.netpolicy import AddressPolicy
from streams.settings import Settings
from tests.hostile import (
    HostileServer,
    SecretServer,
    deflate_raw,
    encoded,
    redirect,
    slow_drip,
    text,
    zeros_gzip,
)

SITE = "https://docs.example.org"


def settings(**kw: object) -> Settings:
    base: dict[str, object] = {
        "fetch_backoff_s": 0.01,
        "fetch_attempts": 3,
        "fetch_robots": False,
        "fetch_host_rate": 1000.0,
        "fetch_host_rate_max": 1000.0,
        "fetch_allow": "",
    }
    return Settings(**{**base, **kw})


Handler = Callable[[httpx.Request], httpx.Response]


def fetch(handler: Handler, url: str = f"{SITE}/page", **kw: object) -> object:
    """Fetch ``url`` through a MockTransport; the Page, or the FetchFailed raised."""
    etag = kw.pop("etag", None)
    fetcher = Fetcher(settings(**kw), transport=httpx.MockTransport(handler))

    async def go() -> object:
        try:
            return await fetcher.fetch(url, etag=etag)  # type: ignore[arg-type]
        except FetchFailed as exc:
            return exc
        finally:
            await fetcher.aclose()

    return asyncio.run(go())


class Raw(httpx.AsyncByteStream):
    """A body as the network gives it: raw bytes in pieces, never decoded by httpx (a
    Response built from ``content=bytes`` is read, and decoded, when it is built)."""

    def __init__(self, data: bytes, piece: int = 65536) -> None:
        self.data = data
        self.piece = piece

    async def __aiter__(self):
        for i in range(0, len(self.data), self.piece):
            yield self.data[i : i + self.piece]


Spec = tuple[int, bytes, dict[str, str]]


def resp(status: int, body: bytes = b"", **headers: str) -> Spec:
    return status, body, {k.replace("_", "-"): v for k, v in headers.items()}


def ok(body: bytes = b"hello", **headers: str) -> Spec:
    return resp(200, body, **{"Content-Type": "text/plain", **headers})


def build(spec: Spec) -> httpx.Response:
    status, body, headers = spec
    return httpx.Response(
        status, headers={**headers, "Content-Length": str(len(body))}, stream=Raw(body)
    )


class Script:
    """A handler answering from a list of responses in turn (the last one repeats)."""

    def __init__(self, *responses: Spec) -> None:
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return build(self.responses[min(len(self.requests), len(self.responses)) - 1])


# --- retries, statuses --------------------------------------------------------------------


def test_transient_errors_are_retried_then_succeed() -> None:
    script = Script(resp(500), resp(502), ok(b"third time"))
    page = fetch(script)
    assert getattr(page, "body", None) == b"third time"
    assert len(script.requests) == 3


def test_transient_failure_after_attempts_is_marked_transient() -> None:
    script = Script(resp(500))
    exc = fetch(script)
    assert isinstance(exc, FetchFailed)
    assert (exc.error_class, exc.attempts, exc.transient, exc.status) == (
        "http_status",
        3,
        True,
        500,
    )
    assert len(script.requests) == 3


def test_connect_errors_are_transient() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    exc = fetch(refuse)
    assert isinstance(exc, FetchFailed)
    assert exc.error_class == "fetch" and exc.transient and exc.attempts == 3


def test_permanent_status_is_not_retried() -> None:
    script = Script(resp(403))
    exc = fetch(script)
    assert isinstance(exc, FetchFailed)
    assert (exc.error_class, exc.transient, exc.attempts) == ("http_status", False, 1)
    assert len(script.requests) == 1


@pytest.mark.parametrize("status", [404, 410])
def test_gone(status: int) -> None:
    page = fetch(Script(resp(status)))
    assert getattr(page, "gone", False) and page.status == status  # type: ignore[attr-defined]


def test_not_modified_sends_validators() -> None:
    script = Script(resp(304, ETag='"v1"'))
    page = fetch(script, etag='"v1"')
    assert getattr(page, "not_modified", False)
    assert script.requests[0].headers["If-None-Match"] == '"v1"'
    assert script.requests[0].headers["Accept-Encoding"] == "gzip, deflate"
    assert script.requests[0].headers["User-Agent"].startswith("ragstream/")


def test_retry_after_waits_without_spending_attempts() -> None:
    """Five 429s then a page, with 2 attempts: the waits are not attempts."""
    limited = resp(429, Retry_After="0")
    script = Script(limited, limited, limited, limited, limited, ok(b"finally"))
    page = fetch(script, fetch_attempts=2)
    assert getattr(page, "body", None) == b"finally", page
    assert len(script.requests) == 6


def test_503_with_an_http_date_waits_too() -> None:
    soon = resp(503, Retry_After="Wed, 21 Oct 2015 07:28:00 GMT")
    script = Script(soon, soon, ok())
    assert getattr(fetch(script, fetch_attempts=1), "status", None) == 200


@pytest.mark.slow  # seconds of real waits: test_fetcher_mock.py has them on a virtual clock
def test_patience_runs_out_then_429_counts_as_transient_failure() -> None:
    script = Script(resp(429, Retry_After="1"))
    t0 = time.monotonic()
    exc = fetch(script, fetch_patience_s=2.5, fetch_attempts=2)
    assert isinstance(exc, FetchFailed)
    assert (exc.error_class, exc.status, exc.transient) == ("http_status", 429, True)
    assert "patience" in str(exc)
    # 2 waits of 1 s fit the patience, the third does not: then 2 attempts are spent
    assert len(script.requests) == 4
    assert 2.0 <= time.monotonic() - t0 < 6


@pytest.mark.slow  # seconds of real waits: test_fetcher_mock.py has them on a virtual clock
def test_retry_after_beyond_patience_is_not_waited_for() -> None:
    """A day is beyond a patience of 2 s: each answer spends an attempt at once (the host
    itself stays paused for the patience, at most)."""
    script = Script(resp(429, Retry_After="86400"))
    t0 = time.monotonic()
    exc = fetch(script, fetch_patience_s=2, fetch_attempts=2)
    assert isinstance(exc, FetchFailed) and exc.transient and exc.status == 429
    assert len(script.requests) == 2
    assert time.monotonic() - t0 < 5


def test_retry_after_parsing() -> None:
    assert retry_after_s("7") == 7.0
    assert retry_after_s(" 120 ") == 120.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470) == 10.0
    assert retry_after_s("soon") is None and retry_after_s(None) is None
    assert retry_after_s("900", cap=300) == 300


# --- bounds ---------------------------------------------------------------------------------


def test_too_large_by_content_length() -> None:
    exc = fetch(Script(ok(b"x" * 2000)), fetch_max_bytes=1000)
    assert isinstance(exc, FetchFailed) and exc.error_class == "too_large"
    assert not exc.transient and exc.attempts == 1


def test_too_large_while_streaming_without_length() -> None:
    class Endless(httpx.AsyncByteStream):
        async def __aiter__(self):
            while True:
                yield b"y" * 65536

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Endless())

    exc = fetch(handler, fetch_max_bytes=300_000)
    assert isinstance(exc, FetchFailed) and exc.error_class == "too_large"


def test_gzip_bomb_is_capped_with_bounded_memory() -> None:
    bomb = zeros_gzip(64)  # 64 MiB of zeros in about 65 KB
    assert len(bomb) < 100_000
    handler = Script(ok(bomb, **{"Content-Encoding": "gzip"}))
    tracemalloc.start()
    try:
        exc = fetch(handler, fetch_max_bytes=1_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(exc, FetchFailed) and exc.error_class == "too_large", exc
    assert "decoded" in str(exc) and not exc.transient
    assert peak < 8 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"


def test_stacked_encodings_are_refused() -> None:
    bomb = zeros_gzip(64, layers=2)  # a few hundred bytes on the wire
    assert len(bomb) < 1000
    exc = fetch(Script(ok(bomb, **{"Content-Encoding": "gzip, gzip"})))
    assert isinstance(exc, FetchFailed) and exc.error_class == "unsupported_encoding"
    assert not exc.transient


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "gzip, br"])
def test_encodings_we_did_not_ask_for_are_refused(encoding: str) -> None:
    exc = fetch(Script(ok(b"whatever", **{"Content-Encoding": encoding})))
    assert isinstance(exc, FetchFailed) and exc.error_class == "unsupported_encoding"


@pytest.mark.parametrize(
    ("encoding", "data"),
    [
        ("gzip", gzip.compress(b"hello gzip " * 100)),
        ("x-gzip", gzip.compress(b"hello gzip " * 100)),
        ("deflate", zlib.compress(b"hello gzip " * 100)),
        ("deflate", deflate_raw(b"hello gzip " * 100)),
        ("identity", b"hello gzip " * 100),
        ("GZIP", gzip.compress(b"hello gzip " * 100)),
    ],
)
def test_one_layer_is_decoded(encoding: str, data: bytes) -> None:
    page = fetch(Script(ok(data, **{"Content-Encoding": encoding})))
    assert getattr(page, "body", None) == b"hello gzip " * 100


def test_body_reader_in_small_pieces_and_multi_member_gzip() -> None:
    data = gzip.compress(b"a" * 5000) + gzip.compress(b"b" * 5000)
    reader = BodyReader("u", "gzip", 20_000)
    for i in range(0, len(data), 7):
        assert reader.feed(data[i : i + 7])
    assert reader.finish() == b"a" * 5000 + b"b" * 5000
    cut = BodyReader("u", "gzip", 20_000)
    cut.feed(gzip.compress(b"c" * 5000)[:-20])
    with pytest.raises(FetchFailed) as info:
        cut.finish()
    assert info.value.error_class == "fetch" and info.value.transient
    broken = BodyReader("u", "gzip", 20_000)
    with pytest.raises(FetchFailed, match="broken gzip"):
        broken.feed(b"\x1f\x8b" + b"\x00" * 50)
    truncating = BodyReader("u", "gzip", 100, truncate=True)
    assert truncating.feed(zeros_gzip(1)) is False
    assert truncating.finish() == bytes(100)


def test_slow_drip_hits_the_deadline() -> None:
    """Each read arrives well within the read timeout; the page as a whole does not."""
    with HostileServer({"/drip": slow_drip(0.2)}) as server:
        s = settings(fetch_allow="127.0.0.1/32", fetch_deadline_s=2.0, fetch_timeout_s=1.0)
        fetcher = Fetcher(s)

        async def go() -> FetchFailed:
            try:
                with pytest.raises(FetchFailed) as info:
                    await fetcher.fetch(server.url("/drip"))
                return info.value
            finally:
                await fetcher.aclose()

        t0 = time.monotonic()
        exc = asyncio.run(go())
        took = time.monotonic() - t0
    assert exc.error_class == "deadline" and not exc.transient
    assert exc.attempts == 1 and server.hits["/drip"] == 1
    assert 1.9 <= took < 2.0 + 1.5, took


def test_cut_off_body_is_transient() -> None:
    from tests.hostile import cut_off

    with HostileServer({"/cut": lambda h: cut_off(h, b"z" * 10_000)}) as server:
        s = settings(fetch_allow="127.0.0.1/32")
        fetcher = Fetcher(s)

        async def go() -> FetchFailed:
            try:
                with pytest.raises(FetchFailed) as info:
                    await fetcher.fetch(server.url("/cut"))
                return info.value
            finally:
                await fetcher.aclose()

        exc = asyncio.run(go())
    assert exc.error_class == "fetch" and exc.transient and exc.attempts == 3
    assert server.hits["/cut"] == 3


# --- redirects ------------------------------------------------------------------------------


def chain_handler(n: int, final: Spec) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        step = int(request.url.params.get("step", "0"))
        if step < n:
            return httpx.Response(302, headers={"Location": f"/page?step={step + 1}"})
        return build(final)

    return handler


def test_redirects_are_followed_up_to_the_limit() -> None:
    page = fetch(chain_handler(5, ok(b"landed")))
    assert getattr(page, "body", None) == b"landed"
    assert page.url == f"{SITE}/page?step=5"  # type: ignore[attr-defined]
    exc = fetch(chain_handler(6, ok(b"landed")))
    assert isinstance(exc, FetchFailed) and exc.error_class == "too_many_redirects"
    assert not exc.transient and exc.attempts == 1


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1/admin",
        "http://2130706433/",
        "http://0177.0.0.1/",
        "http://[::ffff:127.0.0.1]/",
        "http://169.254.169.254/latest/meta-data/iam/",
        "http://[fd00:ec2::254]/",
        "file:///etc/passwd",
        "ftp://example.org/x",
    ],
)
def test_each_redirect_hop_is_checked(target: str) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(301, headers={"Location": target})

    exc = fetch(handler)
    assert isinstance(exc, FetchFailed) and exc.error_class == "forbidden_address", exc
    assert seen == [f"{SITE}/page"]  # the forbidden hop was never requested
    assert "redirects to" in str(exc)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://2130706433/",
        "http://0177.0.0.1/",
        "http://0x7f.1/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://10.1.2.3/",
        "http://169.254.169.254/",
    ],
)
def test_forbidden_literal_urls_are_refused_before_any_request(url: str) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return build(ok())

    exc = fetch(handler, url=url)
    assert isinstance(exc, FetchFailed) and exc.error_class == "forbidden_address"
    assert not exc.transient and seen == []


def test_allowed_odd_spelling_is_fetched_under_its_usual_name() -> None:
    script = Script(ok(b"intranet"))
    page = fetch(script, url="http://0x7f.1:8080/x", fetch_allow="127.0.0.0/8")
    assert getattr(page, "body", None) == b"intranet"
    assert str(script.requests[0].url) == "http://127.0.0.1:8080/x"


# --- the guarded backend: resolve once, check every address, connect to a checked one ------


class FakeNet(httpcore.AsyncNetworkBackend):
    """Records where connections would go; connects nowhere."""

    def __init__(self) -> None:
        self.connects: list[tuple[str, int]] = []

    async def connect_tcp(self, host, port, timeout=None, **kw):  # noqa: ASYNC109
        self.connects.append((host, port))
        raise httpcore.ConnectError("fake network: not connected")


def resolver(table: dict[str, list[str]]) -> Callable:
    calls: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        if host not in table:
            raise OSError(f"no such host {host}")
        return table[host]

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


@pytest.mark.parametrize(
    ("answers", "refused"),
    [
        (["10.0.0.5"], "private"),
        (["127.0.0.1"], "loopback"),
        (["169.254.169.254"], "cloud metadata"),
        (["::1"], "loopback"),
        (["::ffff:192.168.0.1"], "IPv4-mapped private"),
        (["fe80::1%2"], "link-local"),
        (["93.184.216.34", "10.0.0.5"], "private"),  # one bad answer spoils the name
        (["not-an-address"], "not an address"),
    ],
)
def test_names_resolving_inside_are_refused_before_connecting(
    answers: list[str], refused: str
) -> None:
    net = FakeNet()
    backend = GuardedBackend(AddressPolicy(), resolver({"evil.example": answers}), net)
    with pytest.raises(ForbiddenAddress, match=refused):
        asyncio.run(backend.connect_tcp("evil.example", 80, timeout=1))
    assert net.connects == []


def test_connects_to_the_checked_address_not_a_second_lookup() -> None:
    net = FakeNet()
    resolve = resolver({"public.example": ["93.184.216.34", "2606:2800:220:1::1"]})
    backend = GuardedBackend(AddressPolicy(), resolve, net)
    with pytest.raises(httpcore.ConnectError):
        asyncio.run(backend.connect_tcp("public.example", 443, timeout=1))
    assert resolve.calls == ["public.example"]  # type: ignore[attr-defined]
    assert net.connects == [("93.184.216.34", 443), ("2606:2800:220:1::1", 443)]


def test_allow_list_host_names_and_cidrs_at_connect_time() -> None:
    net = FakeNet()
    resolve = resolver({"wiki.corp.example": ["10.1.1.1"], "other.corp.example": ["10.2.2.2"]})
    backend = GuardedBackend(AddressPolicy.parse("wiki.corp.example"), resolve, net)
    with pytest.raises(httpcore.ConnectError):
        asyncio.run(backend.connect_tcp("wiki.corp.example", 80, timeout=1))
    assert net.connects == [("10.1.1.1", 80)]
    with pytest.raises(ForbiddenAddress):
        asyncio.run(backend.connect_tcp("other.corp.example", 80, timeout=1))
    cidr = GuardedBackend(AddressPolicy.parse("10.2.0.0/16"), resolve, net)
    with pytest.raises(httpcore.ConnectError):
        asyncio.run(cidr.connect_tcp("other.corp.example", 80, timeout=1))
    assert net.connects[-1] == ("10.2.2.2", 80)


def test_unresolvable_name_is_a_transient_connect_error() -> None:
    fetcher = Fetcher(settings(), resolver=resolver({}))

    async def go() -> FetchFailed:
        try:
            with pytest.raises(FetchFailed) as info:
                await fetcher.fetch("http://nowhere.invalid/")
            return info.value
        finally:
            await fetcher.aclose()

    exc = asyncio.run(go())
    assert exc.error_class == "fetch" and exc.transient and "cannot resolve" in str(exc)


def test_fetcher_refuses_a_name_resolving_to_a_forbidden_loopback_alias() -> None:
    """Through the real transport: the name resolves (fake DNS) to the secret server's
    address; the refusal comes before any connection."""
    with SecretServer() as secret:
        s = settings(fetch_allow="127.0.0.1/32")
        fetcher = Fetcher(s, resolver=resolver({"docs.example": [secret.host]}))

        async def go() -> FetchFailed:
            try:
                with pytest.raises(FetchFailed) as info:
                    await fetcher.fetch(f"http://docs.example:{secret.port}/")
                return info.value
            finally:
                await fetcher.aclose()

        exc = asyncio.run(go())
        assert exc.error_class == "forbidden_address" and not exc.transient
        assert "docs.example -> 127.0.0.2" in str(exc)
        time.sleep(0.3)
        assert secret.connections == 0


def test_no_proxy_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    with HostileServer({"/a": text("direct")}) as server:
        fetcher = Fetcher(settings(fetch_allow="127.0.0.1/32"))

        async def go() -> bytes:
            try:
                return (await fetcher.fetch(server.url("/a"))).body
            finally:
                await fetcher.aclose()

        assert asyncio.run(go()) == b"direct"


def test_real_server_redirect_to_secret_is_refused() -> None:
    with SecretServer() as secret, HostileServer() as server:
        server.routes["/go"] = redirect(secret.url)
        server.routes["/gz"] = encoded(gzip.compress(b"zipped"), "gzip")
        fetcher = Fetcher(settings(fetch_allow="127.0.0.1/32"))

        async def go() -> tuple[FetchFailed, bytes]:
            try:
                with pytest.raises(FetchFailed) as info:
                    await fetcher.fetch(server.url("/go"))
                return info.value, (await fetcher.fetch(server.url("/gz"))).body
            finally:
                await fetcher.aclose()

        exc, body = asyncio.run(go())
        assert exc.error_class == "forbidden_address" and body == b"zipped"
        time.sleep(0.3)
        assert secret.connections == 0 and server.hits["/go"] == 1


# --- politeness -----------------------------------------------------------------------------


def test_host_key_ignores_userinfo_case_and_default_port() -> None:
    assert host_key("http://user:pw@Example.ORG./a") == ("http", "example.org", 80)
    assert host_key("http://example.org:80/b") == ("http", "example.org", 80)
    assert host_key("https://example.org/") == ("https", "example.org", 443)
    assert host_key("http://example.org:8080/") == ("http", "example.org", 8080)
    assert host_key("http://[::1]:81/") == ("http", "::1", 81)


def test_host_states_are_bounded_and_busy_hosts_are_kept() -> None:
    async def go() -> None:
        p = Politeness(per_host=2, start_rate=10, max_rate=10, max_hosts=3)
        async with p.use(("http", "busy.example", 80)):
            for i in range(10):
                async with p.use(("http", f"h{i}.example", 80)):
                    pass
            assert len(p) == 3
            assert ("http", "busy.example", 80) in p
            assert ("http", "h9.example", 80) in p

    asyncio.run(go())


def test_aimd_rate() -> None:
    now = [100.0]
    rate = HostRate(start=8, ceiling=20, floor=0.5, clock=lambda: now[0])
    assert rate.wait_s() == 0.0  # the first request goes at once
    assert rate.wait_s() == pytest.approx(1 / 8)  # the next one an interval later
    now[0] += 1 / 8
    assert rate.wait_s() == 0.0
    rate.slow_down()
    assert rate.rate == 4
    rate.slow_down()  # the same overload seen by another request: no second cut
    assert rate.rate == 4
    now[0] += 1.0
    rate.slow_down(pause_s=5)
    assert rate.rate == 2
    assert rate.wait_s() == pytest.approx(5.0)  # Retry-After pauses the host
    now[0] += 5.0
    assert rate.wait_s() == 0.0
    for _ in range(200):
        rate.success()
    assert rate.rate == 20  # back up to the ceiling, no further
    for _ in range(20):
        now[0] += 10
        rate.slow_down()
    assert rate.rate == 0.5  # never below the floor
    rate.min_interval = 3.0  # Crawl-delay
    rate.rate = 20
    now[0] += 10
    assert rate.wait_s() == 0.0
    assert rate.wait_s() == pytest.approx(3.0)


def test_robots_rules_for_our_agent() -> None:
    rules = Robots(
        "User-agent: *\nDisallow: /private/\n\n"
        "User-agent: ragstream\nDisallow: /no-bots/\nCrawl-delay: 2\n",
        0.0,
    )
    assert rules.allows("https://x.example/public")
    assert not rules.allows("https://x.example/no-bots/a")
    assert rules.crawl_delay == 2.0
    other = Robots("User-agent: *\nDisallow: /private/\nCrawl-delay: 99999\n", 0.0)
    assert not other.allows("https://x.example/private/a")
    assert other.crawl_delay == 60.0  # capped
    assert Robots.allow_all(0.0).allows("https://x.example/anything")
    # fractions count (urllib.robotparser reads whole seconds only)
    assert Robots("User-agent: *\nCrawl-delay: 0.5\n", 0.0).crawl_delay == 0.5
    assert Robots("User-agent: other\nCrawl-delay: 5\n", 0.0).crawl_delay == 0.0
    assert Robots("User-agent: a\nUser-agent: RagStream\nCrawl-delay: 1.5\n", 0).crawl_delay == 1.5


def robots_site(robots: Spec | None, log: list[tuple[float, str]]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        log.append((time.monotonic(), request.url.path))
        if request.url.path == "/robots.txt":
            return build(robots if robots is not None else resp(404))
        return build(ok(request.url.path.encode()))

    return handler


def fetch_many(handler: Handler, urls: list[str], **kw: object) -> list[object]:
    kw = {"fetch_robots": True, **kw}
    fetcher = Fetcher(settings(**kw), transport=httpx.MockTransport(handler))

    async def one(url: str) -> object:
        try:
            return await fetcher.fetch(url)
        except FetchFailed as exc:
            return exc

    async def go() -> list[object]:
        try:
            return list(await asyncio.gather(*(one(u) for u in urls)))
        finally:
            await fetcher.aclose()

    return asyncio.run(go())


def test_robots_disallow_and_crawl_delay() -> None:
    log: list[tuple[float, str]] = []
    robots = resp(200, b"User-agent: ragstream\nDisallow: /private/\nCrawl-delay: 0.4\n")
    urls = [f"{SITE}/a", f"{SITE}/private/b", f"{SITE}/c", f"{SITE}/d"]
    results = fetch_many(robots_site(robots, log), urls)
    refused = results[1]
    assert isinstance(refused, FetchFailed) and refused.error_class == "robots_disallowed"
    assert not refused.transient
    assert all(getattr(r, "status", None) == 200 for i, r in enumerate(results) if i != 1)
    paths = [p for _, p in log]
    assert paths.count("/robots.txt") == 1  # read once, cached for the host
    assert "/private/b" not in paths
    times = [t for t, _ in log]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(g >= 0.35 for g in gaps), gaps  # Crawl-delay 0.4 between requests


def test_robots_missing_means_allowed_and_userinfo_shares_the_host() -> None:
    log: list[tuple[float, str]] = []
    urls = [f"{SITE}/a", "https://someone@docs.example.org/b", "https://DOCS.example.org:443/c"]
    results = fetch_many(robots_site(None, log), urls)
    assert [getattr(r, "status", r) for r in results] == [200, 200, 200]
    assert [p for _, p in log].count("/robots.txt") == 1


def test_robots_server_errors_are_transient_and_retried() -> None:
    log: list[tuple[float, str]] = []
    results = fetch_many(robots_site(resp(500), log), [f"{SITE}/a"], fetch_attempts=2)
    exc = results[0]
    assert isinstance(exc, FetchFailed) and exc.error_class == "robots_unavailable"
    assert exc.transient
    assert "/a" not in [p for _, p in log]  # not fetched against rules we could not read


@pytest.mark.slow  # seconds of real waits: test_fetcher_mock.py has them on a virtual clock
def test_a_rate_limited_host_is_slowed_down() -> None:
    """A host that allows 20 requests/s (429 past it): every page arrives, none fails."""
    stamps: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        now = time.monotonic()
        recent = [t for t in stamps if t > now - 1.0]
        if len(recent) >= 20:
            return build(resp(429, Retry_After="1"))
        stamps.append(now)
        return build(ok())

    urls = [f"{SITE}/p{i}" for i in range(60)]
    results = fetch_many(
        handler,
        urls,
        fetch_robots=False,
        fetch_host_rate=50,
        fetch_host_rate_max=100,
        fetch_attempts=1,
    )
    assert all(getattr(r, "status", r) == 200 for r in results), results
