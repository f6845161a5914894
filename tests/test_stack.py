"""``ragstream up`` / ``ps`` / ``status`` / ``down`` on the real broker, and the pure figures."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from devtools import kafka_local
from devtools.corpus import CorpusServer, corpus_files, subset
from ops import stack
from ops.status import Reading, delta, live, parse_metrics, quantile, read_metrics
from streams.milvus_lite import pid_alive
from streams.settings import Settings
from tests.helpers import publish_urls

# --- pure ---------------------------------------------------------------------------------


def test_quantile_interpolates_like_prometheus() -> None:
    buckets = [(1.0, 10.0), (2.0, 30.0), (5.0, 40.0), (float("inf"), 40.0)]
    assert quantile(buckets, 0.25) == 1.0  # rank 10: the top of the first bucket
    assert quantile(buckets, 0.5) == pytest.approx(1.5)  # rank 20: half-way through (1, 2]
    assert quantile(buckets, 0.99) == pytest.approx(2.0 + 3.0 * (39.6 - 30) / 10)
    assert quantile([(1.0, 0.0), (float("inf"), 0.0)], 0.5) is None
    assert quantile([(1.0, 0.0), (float("inf"), 5.0)], 0.5) == 1.0  # beyond the last bound
    assert delta([(1.0, 10.0), (2.0, 30.0)], [(1.0, 4.0), (2.0, 4.0)]) == [(1.0, 6.0), (2.0, 26.0)]


PAGE_A = """# TYPE ragstream_messages_in_total counter
ragstream_messages_in_total{stage="fetch",topic="urls"} 10.0
# TYPE ragstream_embed_busy_seconds_total counter
ragstream_embed_busy_seconds_total 3.0
# TYPE ragstream_freshness_seconds histogram
ragstream_freshness_seconds_bucket{le="1.0"} 1.0
ragstream_freshness_seconds_bucket{le="10.0"} 2.0
ragstream_freshness_seconds_bucket{le="+Inf"} 2.0
ragstream_freshness_seconds_count 2.0
ragstream_freshness_seconds_sum 6.0
# TYPE ragstream_dead_letters_total counter
ragstream_dead_letters_total{reason="http_404",stage="fetch"} 2.0
"""


def test_live_figures_from_two_readings() -> None:
    first = Reading(100.0, parse_metrics([PAGE_A]), 1)
    later_page = (
        PAGE_A.replace("} 10.0", "} 30.0")
        .replace("total 3.0", "total 4.0")
        .replace('le="10.0"} 2.0', 'le="10.0"} 4.0')
        .replace('le="+Inf"} 2.0', 'le="+Inf"} 4.0')
    )
    second = Reading(110.0, parse_metrics([later_page, PAGE_A.split("# TYPE ragstream_emb")[0]]), 2)
    figures = live(second, first)
    assert figures.rates is not None
    assert figures.rates["fetch"] == pytest.approx((30 + 10 - 10) / 10)  # two processes summed
    assert figures.busy == pytest.approx(0.1)
    # the last interval's two observations were both in (1, 10]: p50 inside it
    assert figures.fresh_p50 is not None and 1.0 < figures.fresh_p50 <= 10.0
    assert figures.dead == {"fetch": 2.0}
    once = live(first)
    assert once.rates is None and once.busy is None
    assert once.fresh_p50 == 1.0


# --- the stack on the real broker ---------------------------------------------------------


def cli(settings: Settings, *argv: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **settings.to_env(), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ragstream.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def scrape(url: str) -> Reading:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return Reading(time.time(), parse_metrics([resp.read().decode()]), 1)


@pytest.mark.kafka
def test_up_ps_status_down(settings: Settings, django_docs: Path) -> None:
    port = kafka_local.free_port()
    up = cli(settings, "up", "--api-port", str(port), "--wait", "300")
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        rows = {r.name: r for r in stack.ps(settings)}
        assert {"fetch", "embed", "write", "api", "worker", "milvus"} <= set(rows)
        for name in ("fetch", "embed", "write", "api"):
            assert rows[name].state == "ready", rows[name]
            assert rows[name].metrics.startswith("http://127.0.0.1:"), rows[name]
        # the test's broker answers, but this home did not start it
        assert (rows["kafka"].state, rows["kafka"].pid) == ("running", None)
        for name in ("fetch", "embed", "write", "api"):
            assert f"{rows[name].metrics}" in up.stdout  # the table shows the metrics URLs

        again = cli(settings, "up", "--api-port", str(port), "--wait", "60")
        assert again.returncode == 0, again.stderr[-2000:]
        assert "starting" not in again.stderr  # idempotent: nothing started twice
        assert {r.name: r.pid for r in stack.ps(settings)} == {n: r.pid for n, r in rows.items()}

        before = {n: scrape(rows[n].metrics) for n in ("fetch", "embed", "write")}
        files = subset(corpus_files(django_docs), 3)
        with CorpusServer(django_docs) as server:
            publish_urls(settings, [server.url_of(p) for p in files])
            deadline = time.monotonic() + 240
            while True:
                write = scrape(rows["write"].metrics)
                done = write.total("ragstream_freshness_seconds_count") - before["write"].total(
                    "ragstream_freshness_seconds_count"
                )
                if done >= len(files):
                    break
                assert time.monotonic() < deadline, "pages not written"
                time.sleep(1.0)
        after = {n: scrape(rows[n].metrics) for n in ("fetch", "embed")}

        def grew(stage: str, name: str, now: Reading, **labels: str) -> float:
            return now.total(name, **labels) - before[stage].total(name, **labels)

        assert grew("fetch", "ragstream_messages_in_total", after["fetch"]) == len(files)
        assert grew("fetch", "ragstream_fetch_seconds_count", after["fetch"]) >= len(files)
        assert grew("embed", "ragstream_encode_tokens_total", after["embed"]) > 0
        assert grew("embed", "ragstream_embed_busy_seconds_total", after["embed"]) > 0
        assert grew("write", "ragstream_rows_written_total", write) > 0
        assert read_metrics(settings).processes == 4

        status = cli(settings, "status", timeout=60)
        assert status.returncode == 0, status.stderr
        freshness = next(ln for ln in status.stdout.splitlines() if ln.startswith("freshness"))
        assert "page p50 -" not in freshness, freshness  # a measured figure
        assert any(ln.startswith("rates: fetch") for ln in status.stdout.splitlines())
    finally:
        down = cli(settings, "down", timeout=120)
    assert down.returncode == 0, down.stderr
    for row in rows.values():
        if row.name in ("fetch", "embed", "write", "api", "worker") and row.pid:
            assert not pid_alive(row.pid), row
    assert list((settings.home / "run").glob("*.json")) == []
    assert stack.ps(settings)[0].state == "running"  # the test's broker: untouched by down
