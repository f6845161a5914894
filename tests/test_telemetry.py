"""Metrics, probes and JSON logs: the pure rules, one endpoint, and a live pipeline's figures."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agents import telemetry
from devtools.corpus import CorpusServer, corpus_files, subset
from streams import logs, metrics
from streams.settings import Settings
from tests.helpers import Worker, baseline, publish_urls, wait_for


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(page: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in page.items() if n == name and want <= set(ls))


# --- pure rules ---------------------------------------------------------------------------


def test_host_labels_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "_hosts", set())
    monkeypatch.setattr(metrics, "MAX_HOSTS", 3)
    got = [metrics.host_label(f"h{i}.example") for i in range(5)]
    assert got == ["h0.example", "h1.example", "h2.example", "other", "other"]
    assert metrics.host_label("H1.example") == "h1.example"  # known hosts keep their label


def test_status_classes() -> None:
    assert [metrics.status_class(s) for s in (200, 304, 404, 503, None, 42)] == [
        "2xx",
        "3xx",
        "4xx",
        "5xx",
        "error",
        "error",
    ]


def test_freshness_counts_a_page_once_its_last_chunk_is_written() -> None:
    now = 1_800_000_010.0
    at = "2027-01-15T08:00:00.000Z"  # 1_800_000_000 s
    per_chunk, per_page = metrics.freshness_samples(
        [(at, 0, 3), (at, 1, 3), (at, 2, 3), (None, 0, 1), ("not a time", 0, 1), (at, 4, 9)],
        now,
    )
    assert per_chunk == [10.0, 10.0, 10.0, 10.0]
    assert per_page == [10.0]  # the page of 3: its last chunk; the page of 9 is not done
    # a publisher's clock ahead of the writer's is not a negative latency
    assert metrics.age_s("2027-01-15T08:00:20Z", now) == 0.0
    assert metrics.age_s("2027-01-15T08:00:00", now) is None  # no zone: not a time we trust


def test_json_logs_are_one_object_per_record(capsys: pytest.CaptureFixture[str]) -> None:
    logs.setup("json", logging.INFO, stage="embed")
    try:
        log = logging.getLogger("ragstream.test")
        log.info("hello %s", "world")
        try:
            raise ValueError("bad\nthing")
        except ValueError:
            log.exception("it broke")
    finally:
        logs.setup("text")
    lines = capsys.readouterr().err.strip().splitlines()
    first, second = (json.loads(line) for line in lines[-2:])
    assert first["msg"] == "hello world"
    assert first["level"] == "info" and first["stage"] == "embed"
    assert first["logger"] == "ragstream.test" and first["ts"].endswith("Z")
    assert second["level"] == "error" and "ValueError: bad\nthing" in second["exc"]


# --- one process's endpoint ---------------------------------------------------------------


def test_endpoint_serves_metrics_and_probes(unit_settings: Settings) -> None:
    served = telemetry.serve(unit_settings, "probe-test")
    assert served is not None
    server, run_file = served
    health = telemetry.HEALTH
    saved = (health.beat, health.not_ready, health.stall_s)
    try:
        record = json.loads(run_file.read_text())
        base = record["address"]
        metrics.DEAD_LETTERS.labels("probe-test", "schema").inc()
        status, body = get(f"{base}/metrics")
        assert status == 200
        assert total(samples(body), "ragstream_dead_letters_total", stage="probe-test") == 1

        health.beat, health.stall_s = time.monotonic(), 60.0
        telemetry.set_ready("loading the model")
        assert get(f"{base}/livez") == (200, "ok\n")
        assert get(f"{base}/readyz") == (503, "loading the model\n")
        telemetry.set_ready()
        assert get(f"{base}/readyz") == (200, "ok\n")
        health.beat = time.monotonic() - 120  # the event loop stopped turning
        status, why = get(f"{base}/livez")
        assert status == 503 and "stalled" in why
        assert get(f"{base}/readyz")[0] == 503
        assert get(f"{base}/nope")[0] == 404
    finally:
        health.beat, health.not_ready, health.stall_s = saved
        server.shutdown()
        server.server_close()
        run_file.unlink(missing_ok=True)


def test_endpoint_off(unit_settings: Settings) -> None:
    off = unit_settings.model_copy(update={"metrics_port": -1})
    assert telemetry.serve(off, "x") is None
    assert not (off.home / "run").exists()


# --- a live pipeline ----------------------------------------------------------------------


def stage_pages(settings: Settings) -> dict[str, dict]:
    """Each live stage process's /metrics, by its run file's name."""
    out: dict[str, dict] = {}
    for path in sorted((settings.home / "run").glob("*.json")):
        record = json.loads(path.read_text())
        status, body = get(f"{record['address']}/metrics")
        assert status == 200, path
        out[record["name"]] = samples(body)
    return out


@pytest.mark.kafka
def test_stages_export_what_they_do(settings: Settings, django_docs: Path, tmp_path: Path) -> None:
    settings = settings.model_copy(update={"log_format": "json"})
    files = subset(corpus_files(django_docs), 4)
    with CorpusServer(django_docs) as server:
        base = baseline(settings)
        worker = Worker(settings)
        try:
            publish_urls(settings, [server.url_of(p) for p in files])
            snap = wait_for(settings, base, len(files), worker)
            deadline = time.monotonic() + 30
            while True:  # the window's freshness is observed just after its ack
                pages = stage_pages(settings)
                if total(pages.get("write", {}), "ragstream_freshness_seconds_count") >= len(files):
                    break
                assert time.monotonic() < deadline, pages.get("write")
                time.sleep(0.5)
            ready = {
                name: get(json.loads(p.read_text())["address"] + "/readyz")[0]
                for p in (settings.home / "run").glob("*.json")
                for name in [json.loads(p.read_text())["name"]]
            }
        finally:
            worker.stop()
    assert set(pages) == {"fetch", "embed", "write"}
    assert ready == {"fetch": 200, "embed": 200, "write": 200}
    fetch, embed, write = pages["fetch"], pages["embed"], pages["write"]
    urls, chunks, vectors = (settings.topic(t) for t in ("urls", "chunks", "vectors"))
    assert total(fetch, "ragstream_messages_in_total", topic=urls) == len(files)
    assert total(fetch, "ragstream_messages_out_total", topic=chunks) == snap.chunks
    assert total(fetch, "ragstream_fetch_seconds_count", status_class="2xx") >= len(files)
    assert total(fetch, "ragstream_fetch_requests_total", host="127.0.0.1") >= len(files)
    assert total(embed, "ragstream_messages_in_total", topic=chunks) == snap.chunks
    assert total(embed, "ragstream_messages_out_total", topic=vectors) == snap.chunks
    assert total(embed, "ragstream_encode_texts_total") == snap.chunks
    assert total(embed, "ragstream_encode_tokens_total") > snap.chunks
    assert total(embed, "ragstream_embed_busy_seconds_total") > 0
    assert total(write, "ragstream_rows_written_total") == snap.written
    assert total(write, "ragstream_window_rows_count") >= 1
    assert total(write, "ragstream_chunk_freshness_seconds_count") == snap.written
    assert total(write, "ragstream_freshness_seconds_count") == len(files)
    assert (
        "ragstream_consumer_lag",
        (("partition", "0"), ("stage", "write"), ("topic", vectors)),
    ) in write
    # the stages logged JSON, one object a line
    stage_lines = [
        json.loads(line)
        for line in worker.log.read_text().splitlines()
        if line.startswith("{") and '"stage"' in line
    ]
    assert {line["stage"] for line in stage_lines} >= {"fetch", "embed", "write"}
    # processes gone, run files gone with them
    assert list((settings.home / "run").glob("*.json")) == []


# --- the HTTP API -------------------------------------------------------------------------


def test_api_serves_metrics_probes_and_its_run_file(unit_settings: Settings) -> None:
    """No broker needed: the API starts without Kafka (its producer connects in the
    background), so /metrics and /livez answer while /readyz says why it is not ready."""
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from ops.webhooks import create_app
    from streams import runfiles

    settings = unit_settings.model_copy(update={"broker": "127.0.0.1:1", "webhook_secret": "s"})

    async def scenario() -> tuple[int, int, str, str, list[str]]:
        app = create_app(settings, search=False, advertise=("0.0.0.0", 8088))
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            before = await (await client.get("/metrics")).text()  # counters are per process
            live = (await client.get("/livez")).status
            ready = (await client.get("/readyz")).status
            await client.post("/v1/urls", data=b"{}")  # unsigned: 401
            await client.get("/no/such/path")
            page = await (await client.get("/metrics")).text()
            names = [r.address for r in runfiles.read(settings, "api")]
        return live, ready, before, page, names

    live, ready, before, page, names = asyncio.run(scenario())
    assert (live, ready) == (200, 503)
    old, new = samples(before), samples(page)

    def more(**labels: str) -> float:
        name = "ragstream_http_requests_total"
        return total(new, name, **labels) - total(old, name, **labels)

    assert more(route="/v1/urls", status="401") == 1
    assert more(route="/livez", status="200") == 1
    assert more(status="404") == 1
    assert names == ["http://127.0.0.1:8088"]  # a wildcard listener is reached on loopback


def test_every_metric_is_documented() -> None:
    """docs/operations.md lists every metric streams/metrics.py defines (and no other)."""
    import re

    from prometheus_client.metrics import MetricWrapperBase

    defined = set()
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            kind = obj._type  # counter names gain _total on the wire
            defined.add(obj._name + ("_total" if kind == "counter" else ""))
    doc = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    documented = set(re.findall(r"^\| `(ragstream_[a-z_]+)` \|", doc, re.MULTILINE))
    assert documented == defined


def test_logs_follow_stderr_when_a_caller_swaps_and_closes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CLI configures logging on every in-process run (tests, ``cli_environ``): a
    handler bound to the stderr of that moment wrote to a closed file afterwards."""
    import io

    swapped = io.StringIO()
    monkeypatch.setattr("sys.stderr", swapped)
    logs.setup("text")
    logging.getLogger("ragstream.test").warning("during")
    assert "during" in swapped.getvalue()
    later = io.StringIO()
    monkeypatch.setattr("sys.stderr", later)
    swapped.close()
    logging.getLogger("ragstream.test").warning("after")  # no "I/O operation on closed file"
    assert "Logging error" not in later.getvalue()
    assert later.getvalue().rstrip().endswith("WARNING ragstream.test: after")
