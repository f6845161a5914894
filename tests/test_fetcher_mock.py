"""The Fetcher's waits, exactly: backoff, ``Retry-After``, patience, on a virtual clock.

``tests/test_fetcher.py`` checks what the fetcher does against an ``httpx.MockTransport``
in real time; here the same transport is paired with a virtual clock, so each wait can be
asserted to the second (a ``Retry-After: 7`` is a wait of 7 s, not "some wait") and a test
that waits minutes of fetcher time takes milliseconds.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from typing import Any

import httpx
import pytest

import agents.fetcher
import agents.politeness
from agents.fetcher import MAX_BACKOFF_S, Fetcher, Page
from streams.errors import FetchFailed
from tests.test_fetcher import SITE, Script, ok, resp
from tests.test_fetcher import settings as fetcher_settings

_real_sleep = asyncio.sleep


class VirtualTime:
    """``asyncio.sleep`` for the fetcher and its politeness: records each wait and moves a
    clock instead of sleeping. The politeness clock reads it, so a host paused for 7 s is
    free again once the fetcher has waited 7 s."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waits: dict[str, list[float]] = {"fetcher": [], "politeness": []}

    def clock(self) -> float:
        return self.now

    def asyncio_for(self, who: str) -> Any:
        vt = self

        class Asyncio:
            def __getattr__(self, name: str) -> Any:
                return getattr(asyncio, name)

            @staticmethod
            async def sleep(seconds: float) -> None:
                vt.waits[who].append(seconds)
                vt.now += seconds
                await _real_sleep(0)

        return Asyncio()


@pytest.fixture
def vt(monkeypatch: pytest.MonkeyPatch) -> VirtualTime:
    clock = VirtualTime()
    monkeypatch.setattr(agents.fetcher, "asyncio", clock.asyncio_for("fetcher"))
    monkeypatch.setattr(agents.politeness, "asyncio", clock.asyncio_for("politeness"))
    return clock


def fetch(
    vt: VirtualTime,
    script: Script,
    etag: str | None = None,
    last_modified: str | None = None,
    **kw: object,
) -> Page | FetchFailed:
    """Fetch through ``script`` on the virtual clock; the Page, or the FetchFailed raised."""
    fetcher = Fetcher(fetcher_settings(**kw), transport=httpx.MockTransport(script))
    fetcher.politeness.clock = vt.clock  # host states are made on first use, with this clock

    async def go() -> Page | FetchFailed:
        try:
            return await fetcher.fetch(f"{SITE}/page", etag=etag, last_modified=last_modified)
        except FetchFailed as exc:
            return exc
        finally:
            await fetcher.aclose()

    return asyncio.run(go())


# --- server errors: exponential backoff, each wait an attempt -----------------------------------


def test_server_errors_back_off_exponentially_then_succeed(vt: VirtualTime) -> None:
    script = Script(resp(500), resp(502), resp(504), ok(b"fourth"))
    page = fetch(vt, script, fetch_attempts=4, fetch_backoff_s=0.5)
    assert isinstance(page, Page) and page.body == b"fourth"
    assert len(script.requests) == 4
    assert vt.waits["fetcher"] == [0.5, 1.0, 2.0]


def test_backoff_is_capped_and_the_last_attempt_does_not_wait(vt: VirtualTime) -> None:
    script = Script(resp(500))
    exc = fetch(vt, script, fetch_attempts=5, fetch_backoff_s=10)
    assert isinstance(exc, FetchFailed)
    assert (exc.error_class, exc.status, exc.transient, exc.attempts) == (
        "http_status",
        500,
        True,
        5,
    )
    assert vt.waits["fetcher"] == [10, 20, MAX_BACKOFF_S, MAX_BACKOFF_S]


def test_a_permanent_answer_after_a_retry_stops_at_once(vt: VirtualTime) -> None:
    script = Script(resp(502), ok(b"x" * 2000))
    exc = fetch(vt, script, fetch_attempts=5, fetch_max_bytes=1000)
    assert isinstance(exc, FetchFailed)
    assert (exc.error_class, exc.transient, exc.attempts) == ("too_large", False, 2)
    assert len(script.requests) == 2 and vt.waits["fetcher"] == [0.01]


# --- 429/503: the server's wait, not an attempt -------------------------------------------------


def test_retry_after_seconds_are_waited_exactly_without_spending_attempts(
    vt: VirtualTime,
) -> None:
    script = Script(resp(429, Retry_After="3"), resp(503, Retry_After="7"), ok(b"then"))
    page = fetch(vt, script, fetch_attempts=1, fetch_patience_s=60)
    assert isinstance(page, Page) and page.body == b"then"
    assert vt.waits["fetcher"] == [3.0, 7.0]
    assert len(script.requests) == 3


def test_retry_after_as_an_http_date_is_waited_until_then(vt: VirtualTime) -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    script = Script(resp(503, Retry_After=when), ok())
    page = fetch(vt, script, fetch_attempts=1, fetch_patience_s=60)
    assert isinstance(page, Page) and page.status == 200
    [wait] = vt.waits["fetcher"]
    assert 28 <= wait <= 30


def test_without_retry_after_the_wait_doubles(vt: VirtualTime) -> None:
    script = Script(resp(429), resp(429), resp(503), ok())
    page = fetch(vt, script, fetch_attempts=1, fetch_backoff_s=0.5, fetch_patience_s=60)
    assert isinstance(page, Page) and page.status == 200
    assert vt.waits["fetcher"] == [0.5, 1.0, 2.0]


def test_waits_spend_patience_then_each_answer_spends_an_attempt(vt: VirtualTime) -> None:
    """Patience 10 s, ``Retry-After: 4``: two waits (8 s) fit, the third does not; from
    then on each 429 is a transient failure with the usual backoff between attempts."""
    script = Script(resp(429, Retry_After="4"))
    exc = fetch(vt, script, fetch_attempts=2, fetch_patience_s=10, fetch_backoff_s=0.5)
    assert isinstance(exc, FetchFailed)
    assert (exc.error_class, exc.status, exc.transient, exc.attempts) == (
        "http_status",
        429,
        True,
        2,
    )
    assert "patience" in str(exc)
    assert vt.waits["fetcher"] == [4.0, 4.0, 0.5]
    assert len(script.requests) == 4


def test_a_paused_host_is_not_asked_before_its_retry_after(vt: VirtualTime) -> None:
    """The host's pause is the server's ``Retry-After`` too: the next request (here a
    retry after a 500 that came back quickly) waits for it in the politeness gate."""
    script = Script(resp(429, Retry_After="86400"), resp(500), ok())
    page = fetch(vt, script, fetch_attempts=3, fetch_patience_s=5, fetch_backoff_s=0.5)
    assert isinstance(page, Page) and page.status == 200
    # the day is beyond patience: not waited by the fetcher, an attempt is spent instead,
    # and the host is paused for the patience (5 s) at most
    assert vt.waits["fetcher"] == [0.5, 1.0]
    assert sum(vt.waits["politeness"]) == pytest.approx(5 - 0.5)


# --- validators and gone pages: one request, no wait ---------------------------------------------


def test_not_modified_sends_both_validators_and_reads_no_body(vt: VirtualTime) -> None:
    script = Script(resp(304, ETag='"v2"'))
    modified = "Wed, 21 Oct 2015 07:28:00 GMT"
    page = fetch(vt, script, etag='"v2"', last_modified=modified)
    assert isinstance(page, Page) and page.not_modified and page.body == b""
    sent = script.requests[0].headers
    assert (sent["If-None-Match"], sent["If-Modified-Since"]) == ('"v2"', modified)
    assert len(script.requests) == 1 and vt.waits["fetcher"] == []


def test_a_first_fetch_sends_no_validators(vt: VirtualTime) -> None:
    script = Script(ok())
    fetch(vt, script)
    assert "If-None-Match" not in script.requests[0].headers
    assert "If-Modified-Since" not in script.requests[0].headers


@pytest.mark.parametrize("status", [404, 410])
def test_a_gone_page_is_one_request_and_no_retry(vt: VirtualTime, status: int) -> None:
    script = Script(resp(status, b"gone"))
    page = fetch(vt, script, fetch_attempts=5)
    assert isinstance(page, Page) and page.gone and page.body == b""
    assert len(script.requests) == 1 and vt.waits["fetcher"] == []
