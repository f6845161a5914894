"""Per-host politeness for the fetcher: concurrency, an adaptive request rate, robots.txt.

A site that answers 429/503 is asking to be fetched more slowly, not failing: the rate
for that host is halved (at most once per interval, since all requests in flight see the
same overload) and grows back additively with each success (AIMD, as TCP does), between a
floor and ``fetch_host_rate_max``. ``Retry-After`` pauses the whole host, not only the
page that got it. ``Crawl-delay`` from robots.txt is a minimum interval on top of the rate.

State is keyed by (scheme, host, port) taken from the parsed URL, never by the netloc
string, so ``user@host`` is the same host. It is kept for at most ``fetch_max_hosts``
hosts; the least recently used idle ones are forgotten first (a host in use never is).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.robotparser
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable

import httpx

#: Slowest rate a host is backed down to (one request per 20 s).
MIN_RATE = 0.05
#: A Crawl-delay beyond this is read as this (a robots.txt must not stall a partition).
MAX_CRAWL_DELAY_S = 60.0
#: The product token robots.txt rules are matched against.
ROBOTS_AGENT = "ragstream"
#: robots.txt is read up to this size, the rest ignored (RFC 9309 asks for at least 500 KiB).
ROBOTS_MAX_BYTES = 512 * 1024

HostKey = tuple[str, str, int]
DEFAULT_PORTS = {"http": 80, "https": 443}


def host_key(url: str | httpx.URL) -> HostKey:
    """(scheme, host, port) of a URL: userinfo, case and a trailing dot do not matter."""
    u = httpx.URL(url) if isinstance(url, str) else url
    host = u.host.lower().rstrip(".")
    return u.scheme, host, u.port or DEFAULT_PORTS.get(u.scheme, 0)


def origin(key: HostKey) -> str:
    scheme, host, port = key
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}"


class HostRate:
    """AIMD request rate of one host; ``wait_s`` says when the next request may go."""

    def __init__(
        self,
        start: float,
        ceiling: float,
        floor: float = MIN_RATE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ceiling = max(ceiling, floor)
        self.floor = floor
        self.rate = min(max(start, floor), self.ceiling)
        self.min_interval = 0.0  # Crawl-delay
        self.clock = clock
        self.next_at = 0.0
        self.last_at = float("-inf")
        self.paused_until = 0.0
        self._no_cut_until = 0.0

    @property
    def interval(self) -> float:
        return max(1.0 / self.rate, self.min_interval)

    def wait_s(self) -> float:
        """Seconds until a request may start; 0 means now, and books this request's slot."""
        now = self.clock()
        at = max(self.next_at, self.paused_until)
        if at > now:
            return at - now
        self.last_at = now
        self.next_at = now + self.interval
        return 0.0

    def set_min_interval(self, seconds: float) -> None:
        """Crawl-delay: applies from the last request on (robots.txt's own included)."""
        self.min_interval = seconds
        self.next_at = max(self.next_at, self.last_at + self.interval)

    def success(self) -> None:
        """Additive increase: about +1 request/s per second of successes, gentler when slow."""
        self.rate = min(self.ceiling, self.rate + min(1.0 / self.rate, self.rate / 4))

    def slow_down(self, pause_s: float | None = None) -> None:
        """Multiplicative decrease on 429/503 (once per interval), and a pause if asked."""
        now = self.clock()
        if now >= self._no_cut_until:
            self.rate = max(self.floor, self.rate / 2)
            self._no_cut_until = now + max(1.0, 1.0 / self.rate)
            self.next_at = max(self.next_at, now + self.interval)
        if pause_s:
            self.paused_until = max(self.paused_until, now + pause_s)


def crawl_delay(text: str, agent: str = ROBOTS_AGENT) -> float:
    """The Crawl-delay of the group for ``agent`` (else ``*``), fractions included
    (``urllib.robotparser`` reads whole seconds only and drops ``Crawl-delay: 0.5``)."""
    delays: dict[str, float] = {}
    group: list[str] = []
    in_agents = False
    for line in text.splitlines():
        field, _, value = line.split("#", 1)[0].partition(":")
        field, value = field.strip().lower(), value.strip()
        if field == "user-agent":
            if not in_agents:
                group = []
            group.append(value.lower())
            in_agents = True
        elif field:
            in_agents = False
            if field == "crawl-delay":
                with contextlib.suppress(ValueError):
                    for name in group:
                        delays.setdefault(name, float(value))
    for name, delay in delays.items():
        if name != "*" and name and name in agent.lower():
            return delay
    return delays.get("*", 0.0)


class Robots:
    """The robots.txt rules of one host, for ragstream's user agent."""

    def __init__(self, text: str | None, fetched_at: float) -> None:
        self.fetched_at = fetched_at
        self._parser: urllib.robotparser.RobotFileParser | None = None
        if text is not None:
            parser = urllib.robotparser.RobotFileParser()
            parser.parse(text.splitlines())
            parser.modified()  # can_fetch() answers False until a parser was "read"
            self._parser = parser
        self._delay = crawl_delay(text) if text is not None else 0.0

    @classmethod
    def allow_all(cls, fetched_at: float) -> Robots:
        return cls(None, fetched_at)

    def allows(self, url: str) -> bool:
        return self._parser is None or self._parser.can_fetch(ROBOTS_AGENT, url)

    @property
    def crawl_delay(self) -> float:
        """Crawl-delay, or the interval a Request-rate implies, capped; 0 when none."""
        if self._parser is None:
            return 0.0
        delay = self._delay
        rate = self._parser.request_rate(ROBOTS_AGENT)
        if rate is not None and rate.requests > 0:
            delay = max(delay, rate.seconds / rate.requests)
        return min(max(delay, 0.0), MAX_CRAWL_DELAY_S)


class HostState:
    """Everything the fetcher keeps about one host."""

    def __init__(self, per_host: int, rate: HostRate) -> None:
        self.gate = asyncio.Semaphore(per_host)
        self.rate = rate
        self.robots: Robots | None = None
        self.robots_lock = asyncio.Lock()
        self.users = 0  # fetches using this state now: never evicted while > 0

    def set_robots(self, robots: Robots) -> None:
        self.robots = robots
        self.rate.set_min_interval(robots.crawl_delay)


class Politeness:
    """Host states, bounded in number (LRU over idle hosts)."""

    def __init__(
        self,
        per_host: int,
        start_rate: float,
        max_rate: float,
        max_hosts: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_host = per_host
        self.start_rate = start_rate
        self.max_rate = max_rate
        self.max_hosts = max_hosts
        self.clock = clock
        self._hosts: OrderedDict[HostKey, HostState] = OrderedDict()

    def __len__(self) -> int:
        return len(self._hosts)

    def __contains__(self, key: object) -> bool:
        return key in self._hosts

    def _state(self, key: HostKey) -> HostState:
        state = self._hosts.get(key)
        if state is None:
            rate = HostRate(self.start_rate, self.max_rate, clock=self.clock)
            state = self._hosts[key] = HostState(self.per_host, rate)
            self._evict(keep=key)
        self._hosts.move_to_end(key)
        return state

    def _evict(self, keep: HostKey) -> None:
        if len(self._hosts) <= self.max_hosts:
            return
        for key in [k for k, s in self._hosts.items() if s.users == 0 and k != keep]:
            del self._hosts[key]
            if len(self._hosts) <= self.max_hosts:
                return

    @contextlib.asynccontextmanager
    async def use(self, key: HostKey) -> AsyncIterator[HostState]:
        """The host's state, kept from eviction while the block runs."""
        state = self._state(key)
        state.users += 1
        try:
            yield state
        finally:
            state.users -= 1

    @contextlib.asynccontextmanager
    async def turn(self, state: HostState) -> AsyncIterator[None]:
        """A request slot: one of the host's concurrent fetches, at the host's pace."""
        async with state.gate:
            # Re-checked after each sleep: a 429 elsewhere may have paused the host meanwhile.
            while (wait := state.rate.wait_s()) > 0:  # noqa: ASYNC110
                await asyncio.sleep(wait)
            yield
