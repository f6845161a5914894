"""Transient failures heal through the delay topics; permanent ones go straight to the DLQ;
a delayed retry overtaken by a newer request for its page is dropped."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from devtools.corpus import CorpusServer
from streams.errors import FetchFailed
from streams.retry import is_transient, newest, next_retry, superseded
from streams.settings import Settings
from streams.topics import URLS, retry_delays, retry_topics, stage_lags, topic_specs
from tests.helpers import Worker, baseline, milvus_rows, publish_urls, run, wait_for
from tests.test_deadletters import read_dlq

# --- the rules (no broker) ----------------------------------------------------------------


def test_which_failures_are_transient() -> None:
    # the fetcher's word, where it gives one
    assert is_transient(FetchFailed("http_status", "HTTP 500 for u", 4, transient=True))
    assert not is_transient(FetchFailed("http_status", "HTTP 403 for u", 1, transient=False))

    class Bare(Exception):  # a failure without the flag: classified by its class
        def __init__(self, error_class: str, message: str) -> None:
            super().__init__(message)
            self.error_class = error_class

    assert is_transient(Bare("fetch", "ReadTimeout: (u)"))
    assert is_transient(Bare("http_status", "HTTP 500 for u"))
    assert is_transient(Bare("http_status", "HTTP 503 for u"))
    assert is_transient(Bare("http_status", "HTTP 429 for u"))
    assert not is_transient(Bare("http_status", "HTTP 403 for u"))
    assert not is_transient(Bare("too_large", "u: body over 10 bytes"))
    assert not is_transient(Bare("forbidden_address", "127.0.0.2"))


def test_delays_and_supersession() -> None:
    delays = [1.0, 2.5]
    first = next_retry(0, delays, 1_000)
    assert (first.n, first.delay_s, first.not_before_ms) == (1, 1.0, 2_000)
    assert next_retry(1, delays, 1_000).not_before_ms == 3_500
    assert next_retry(2, delays, 1_000) is None  # spent: a dead letter now
    assert next_retry(0, [], 1_000) is None

    old, new = "2026-05-01T10:00:00.000Z", "2026-05-01T10:00:01.000Z"
    assert superseded(old, new) and not superseded(new, old) and not superseded(old, old)
    assert not superseded("garbage", new) and not superseded(old, None)
    assert newest(old, new) == new and newest(None, old) == old and newest(new, "x") == new


def test_delay_topics_are_created_per_delay(unit_settings: Settings) -> None:
    s = unit_settings.model_copy(update={"fetch_retry_delays": "60, 600,3600"})
    assert retry_delays(s) == [60.0, 600.0, 3600.0]
    names = list(retry_topics(s))
    assert names == [s.topic(f"{URLS}.retry.{n}") for n in (1, 2, 3)]
    assert all(topic_specs(s)[n] == s.url_partitions for n in names)
    assert retry_topics(s.model_copy(update={"fetch_retry_delays": ""})) == {}


# --- on the broker ------------------------------------------------------------------------


class Flaky:
    """/flaky answers 500 to its first ``failures`` requests, then the page; /forbidden is
    always 403; /down always 500. Records when each request came."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.seen: dict[str, list[float]] = {}
        self.lock = threading.Lock()

    def __call__(self, h: BaseHTTPRequestHandler) -> bool:
        path = h.path.split("?")[0]
        with self.lock:
            self.seen.setdefault(path, []).append(time.monotonic())
            n = len(self.seen[path])
        if path == "/forbidden":
            h.reply(403, b"no", "text/plain")
            return True
        if path == "/down" or (path == "/flaky.txt" and n <= self.failures):
            h.reply(500, b"oops", "text/plain")
            return True
        return False


def lags_zero(settings: Settings) -> bool:
    return all(lag.lag == 0 for lag in run(stage_lags(settings)))


@pytest.mark.kafka
def test_transient_failures_heal_through_the_delay_topics(
    settings: Settings, tmp_path: Path
) -> None:
    s = settings.model_copy(
        update={
            "fetch_attempts": 2,
            "fetch_backoff_s": 0.05,
            "fetch_retry_delays": "1,2",
            "fetch_allow": "127.0.0.1/32",
        }
    )
    site = tmp_path / "site"
    site.mkdir()
    (site / "flaky.txt").write_text("Sprockets are healed by patience and delay topics.\n")
    (site / "good.txt").write_text("A good page about widgets.\n")
    hook = Flaky(failures=5)  # 2 attempts, 2 more after 1 s, the 6th after 2 s more succeeds
    with CorpusServer(site, hook=hook) as server:
        base = baseline(s)
        worker = Worker(s, stages="fetch,embed,write")
        try:
            publish_urls(
                s,
                [
                    server.url_of(site / "flaky.txt"),
                    server.base_url + "forbidden",
                    server.url_of(site / "good.txt"),
                ],
            )
            (letter,) = run(read_dlq(s, URLS, 1, timeout_s=120))
            snap = wait_for(s, base, 3, worker, timeout_s=180)
            assert lags_zero(s)
        finally:
            worker.stop()
    # the permanent failure went straight to the dead-letter topic, tried once
    assert (letter.error_class, letter.attempts) == ("http_status", 1), letter
    assert letter.url.endswith("/forbidden") and len(hook.seen["/forbidden"]) == 1
    # the transient one: 6 requests, the delays in between, and no dead letter
    times = hook.seen["/flaky.txt"]
    assert len(times) == 6, times
    assert times[2] - times[1] >= 0.9 and times[4] - times[3] >= 1.9, times
    assert snap.dead == {s.topic("urls.dlq"): 1}, snap.dead
    texts = sorted(r["text"] for r in milvus_rows(s))
    assert texts == [
        "A good page about widgets.",
        "Sprockets are healed by patience and delay topics.",
    ]


@pytest.mark.kafka
def test_a_delayed_retry_overtaken_by_a_newer_request_is_dropped(
    settings: Settings, tmp_path: Path
) -> None:
    s = settings.model_copy(
        update={
            "fetch_attempts": 2,
            "fetch_backoff_s": 0.05,
            "fetch_retry_delays": "3",
            "fetch_allow": "127.0.0.1/32",
        }
    )
    site = tmp_path / "site"
    site.mkdir()
    hook = Flaky(failures=0)
    with CorpusServer(site, hook=hook) as server:
        url = server.base_url + "down"
        baseline(s)
        worker = Worker(s, stages="fetch")
        try:
            publish_urls(s, [url])  # fails twice: waits 3 s in urls.retry.1
            deadline = time.monotonic() + 120
            while len(hook.seen.get("/down", [])) < 2:
                assert time.monotonic() < deadline and worker.alive(), worker.tail()
                time.sleep(0.1)
            publish_urls(s, [url], delete=True)  # the newer wish: the page is gone
            deadline = time.monotonic() + 120
            while True:  # both requests, and the retry forwarded and handled (dropped)
                fetch = run(stage_lags(s))[0]
                if fetch.end == 4 and fetch.lag == 0:
                    break
                assert time.monotonic() < deadline and worker.alive(), worker.tail()
                time.sleep(0.2)
            time.sleep(1)
        finally:
            worker.stop()
        dead = run(read_dlq(s, URLS, 1, timeout_s=2))
    # the retry was dropped: not fetched again, and not dead-lettered
    assert len(hook.seen["/down"]) == 2, worker.tail()
    assert dead == []
