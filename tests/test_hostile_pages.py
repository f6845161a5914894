"""Hostile servers end to end: a gzip bomb, a stacked encoding and a slow drip are dead
letters within their deadline, the fetch stage's memory stays bounded, and the page behind
them on their partition is indexed.

Issue 8 found that httpx undid every ``Content-Encoding`` layer before the size check (a
few hundred bytes on the wire became 64 MiB in memory) and that its timeout was per read,
so a server sending one byte a second held a page, and with acks in offset order its whole
partition, for ever. tests/test_fetcher.py covers the Fetcher alone; here the real worker
(fetch, embed, write) runs on the real broker and Milvus, with one ``urls`` partition so
that the normal page waits behind the hostile ones.
"""

from __future__ import annotations

import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from streams.ids import normalize_url
from streams.settings import Settings
from streams.topics import URLS
from tests.helpers import Worker, baseline, milvus_rows, publish_urls, run, wait_for
from tests.hostile import HostileServer, encoded, send, slow_drip, text, zeros_gzip
from tests.test_deadletters import read_dlq
from tests.test_poison_pages import GOOD, lags, poison_settings

pytestmark = [pytest.mark.kafka]

DEADLINE_S = 4.0
MIB = 1024 * 1024
MAX_BYTES = 4 * MIB
"""The decoded-body cap for this test (default 20 MB): small, so that what a capped reader
may hold (4 MiB) and what decoding the bomb costs (64 MiB, twice over when joined) are far
apart."""
GROWTH_LIMIT = 32 * MIB
"""How far the fetch stage's peak RSS (VmHWM) may rise above its RSS before the hostile pages.

Measured with the capped reader: about 7 MiB (the 4 MiB cap, zlib's buffers, the allocator
noise of four more pages). With the bomb decoded whole and its size checked afterwards
(httpx's order before issue 8): 127 MiB (64 MiB in pieces, then joined). 32 MiB sits well
above the first and well below the second, and below the 64 MiB the bomb decodes to.
"""
WARM = "A first page, to know the stages are up."


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces and ")"


def stage_pid(worker: Worker, stage: str, timeout_s: float = 60) -> int:
    """The pid of the worker's child running ``stage`` (``python -m agents.supervisor
    --stage <stage>``, see agents/supervisor.py), read from /proc (no psutil)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or _ppid(int(entry.name)) != worker.proc.pid:
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--stage" in argv and argv[argv.index(b"--stage") + 1] == stage.encode():
                return int(entry.name)
        time.sleep(0.2)
    raise AssertionError(f"no {stage} stage under worker {worker.proc.pid}:\n{worker.tail()}")


def reset_hwm(pid: int) -> None:
    """Start ``VmHWM`` again from the current RSS (``clear_refs`` 5, Linux 4.0+), so the
    peak measured next is this batch's, not the stage's start-up (model load) spike."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def vm_hwm(pid: int) -> int:
    """Peak resident set size of ``pid`` since start or ``reset_hwm``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_bomb_stacked_encoding_and_slow_drip_are_dead_letters_and_the_page_behind_is_indexed(
    settings: Settings,
) -> None:
    s = poison_settings(
        settings,
        fetch_deadline_s=DEADLINE_S,
        fetch_max_bytes=MAX_BYTES,
        fetch_retry_delays="",  # nothing here is transient; no delay topic may hide a page
    )
    bomb = zeros_gzip(64)  # 64 MiB of zeros in about 65 KB (one gzip layer's best ratio)
    stacked = zeros_gzip(64, layers=2)  # 64 MiB in a few hundred bytes, gzipped twice
    assert len(bomb) < 100_000 and len(stacked) < 1000
    drip_started: list[float] = []
    dripping = slow_drip(1.0)  # one byte a second, 10,000 declared: for ever, for a fetch

    def drip(h: BaseHTTPRequestHandler) -> None:
        drip_started.append(time.time())
        dripping(h)

    routes = {
        "/warm.txt": text(WARM),
        "/bomb.txt": encoded(bomb, "gzip"),
        "/stacked.txt": encoded(stacked, "gzip, gzip"),
        "/drip.txt": drip,
        "/good.html": lambda h: send(h, 200, GOOD, "text/html; charset=utf-8"),
    }
    with HostileServer(routes) as server:
        url = server.url
        worker = Worker(s)
        try:
            base = baseline(s)
            publish_urls(s, [url("/warm.txt")])
            wait_for(s, base, 1, worker, timeout_s=240)
            fetch_pid = stage_pid(worker, "fetch")
            reset_hwm(fetch_pid)
            before = vm_hwm(fetch_pid)  # = its RSS now

            base = baseline(s)
            started = time.monotonic()
            hostile = [url("/bomb.txt"), url("/stacked.txt"), url("/drip.txt")]
            publish_urls(s, [*hostile, url("/good.html")])  # one partition: in this order
            letters = run(read_dlq(s, URLS, 3, timeout_s=DEADLINE_S + 40))
            snap = wait_for(s, base, 4, worker, timeout_s=60)
            while (lag := lags(s)) != {"fetch": 0, "embed": 0, "write": 0}:
                assert time.monotonic() - started < DEADLINE_S + 60, lag
                time.sleep(0.5)
            elapsed = time.monotonic() - started
            after = vm_hwm(fetch_pid)
            # the same fetch process handled them all: no crash and restart hid anything
            assert stage_pid(worker, "fetch", timeout_s=1) == fetch_pid
            assert worker.alive()
        finally:
            worker.stop()
        hits = dict(server.hits)

    growth = after - before
    assert growth < GROWTH_LIMIT, (
        f"fetch stage peak RSS rose {growth / MIB:.1f} MiB ({before / MIB:.0f} -> "
        f"{after / MIB:.0f} MiB) while handling a 64 MiB gzip bomb"
    )
    by_url = {dl.url: dl for dl in letters}
    assert sorted(by_url) == sorted(normalize_url(u) for u in hostile), letters
    classes = {
        path: by_url[normalize_url(url(path))].error_class
        for path in ("/bomb.txt", "/stacked.txt", "/drip.txt")
    }
    assert classes == {
        "/bomb.txt": "too_large",
        "/stacked.txt": "unsupported_encoding",
        "/drip.txt": "deadline",
    }, [(d.url, d.error_class, d.error) for d in letters]
    # The drip ends at its deadline, counted from when the fetch stage reached it (its
    # request), not a read timeout later and not never; one attempt, no retry.
    (drip_at,) = drip_started
    held = epoch(by_url[normalize_url(url("/drip.txt"))].failed_at) - drip_at
    assert DEADLINE_S - 0.5 < held < DEADLINE_S + 5, held
    assert hits["/bomb.txt"] == hits["/stacked.txt"] == hits["/drip.txt"] == 1, hits
    # Everything, the normal page searchable and every lag at 0, well before a hung fetch
    # (10,000 s of drip) could have let the partition go on.
    assert elapsed < DEADLINE_S + 60, elapsed
    assert snap.fetched == 4
    texts = sorted(r["text"] for r in milvus_rows(s))
    assert texts == sorted([WARM, "Sprockets\n\nSprockets turn widgets."]), texts
    assert "exiting so the group redelivers" not in worker.tail(10_000)
