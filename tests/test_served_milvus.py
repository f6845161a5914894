"""Milvus Lite served while a worker writes: search, status and a user's pymilvus client
read the index while the pipeline fills it (issue 10).

The discovery rules run on real processes (a real ``milvus-lite server``, a real ``sleep``
standing in for a reused pid), no mocks; the end-to-end test runs a real worker.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streams import milvus_lite as ml
from streams.settings import Settings


def _served(server: ml.LiteServer, timeout_s: float = 60.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        uri = server.poll()
        if uri is not None:
            return uri
        time.sleep(0.05)
    raise AssertionError("milvus-lite server did not come up")


def _claim(data_dir: Path, pid: int, port: int = 9, claimed_dir: Path | None = None) -> None:
    ml.write_server_file(ml.ServerInfo(pid, ml.HOST, port, str(claimed_dir or data_dir)))


@pytest.fixture
def lite(unit_settings: Settings) -> Path:
    data_dir = ml.lite_dir(unit_settings)
    assert data_dir is not None
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    return data_dir


def test_without_a_server_the_directory_is_opened_embedded(
    unit_settings: Settings, lite: Path
) -> None:
    assert ml.connect_uri(unit_settings) == unit_settings.milvus_target == str(lite)


def test_a_real_server_uri_is_used_as_configured(unit_settings: Settings) -> None:
    s = unit_settings.model_copy(update={"milvus_uri": "http://milvus:19530"})
    assert ml.lite_dir(s) is None
    assert ml.connect_uri(s) == "http://milvus:19530"


def test_a_file_of_a_dead_pid_is_ignored(unit_settings: Settings, lite: Path) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    _claim(lite, proc.pid)
    assert ml.read_server_file(lite) is not None
    assert ml.connect_uri(unit_settings) == str(lite)


def test_a_file_of_a_pid_that_is_no_server_is_ignored(unit_settings: Settings, lite: Path) -> None:
    """A pid reused by another program, even one whose port answers."""
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        _claim(lite, sleeper.pid)
        assert ml.connect_uri(unit_settings) == str(lite)
        _claim(lite, os.getpid())  # alive, not a milvus-lite server
        assert ml.connect_uri(unit_settings) == str(lite)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_garbage_in_the_file_is_ignored(unit_settings: Settings, lite: Path) -> None:
    for text in ("", "{", "[]", '{"pid": "x"}', json.dumps({"pid": 1})):
        ml.server_file(lite).write_text(text)
        assert ml.read_server_file(lite) is None
        assert ml.connect_uri(unit_settings) == str(lite)


def test_served_address_then_back_to_embedded_after_a_clean_stop(
    unit_settings: Settings, lite: Path
) -> None:
    from ops.status import milvus_where
    from ragstream.cli.status import milvus_line

    server = ml.LiteServer(lite)
    try:
        uri = _served(server)
        assert uri.startswith("http://127.0.0.1:")
        assert ml.connect_uri(unit_settings) == uri
        info = ml.read_server_file(lite)
        assert info is not None and info.data_dir == str(lite) and info.uri == uri
        where = milvus_where(unit_settings)
        assert where.served == info and milvus_line(where).startswith(f"{uri} (Milvus Lite")
    finally:
        server.stop()
    assert not ml.server_file(lite).exists()
    assert ml.connect_uri(unit_settings) == str(lite)
    where = milvus_where(unit_settings)
    assert where.served is None and milvus_line(where).startswith(f"{lite} (Milvus Lite, not")


def test_a_server_of_another_directory_does_not_count(
    unit_settings: Settings, lite: Path, tmp_path: Path
) -> None:
    """A live server, but of another directory: its file copied next to ours (a copied
    home), or our file naming the other directory."""
    other = tmp_path / "other.db"
    server = ml.LiteServer(other)
    try:
        uri = _served(server)
        info = ml.read_server_file(other)
        assert info is not None
        ml.server_file(lite).write_text(ml.server_file(other).read_text())
        assert ml.connect_uri(unit_settings) == str(lite)
        _claim(lite, info.pid, info.port, claimed_dir=lite)  # right dir, wrong process
        assert ml.connect_uri(unit_settings) == str(lite)
        assert uri == info.uri
    finally:
        server.stop()


def test_a_stale_file_is_replaced_and_a_killed_server_restarted_on_its_port(
    unit_settings: Settings, lite: Path
) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    _claim(lite, proc.pid)
    server = ml.LiteServer(lite)
    try:
        uri = _served(server)
        first = ml.read_server_file(lite)
        assert first is not None and first.pid != proc.pid and first.uri == uri
        assert server.proc is not None
        server.proc.kill()  # as a crash would
        server.proc.wait()
        assert _served(server) == uri  # same port: a connected writer reconnects
        second = ml.read_server_file(lite)
        assert second is not None and second.pid != first.pid
        assert ml.connect_uri(unit_settings) == uri
    finally:
        server.stop()


def test_a_directory_held_embedded_is_waited_for_with_a_clear_log(
    unit_settings: Settings, lite: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A short ``ragstream search`` holds the directory: the server retries with backoff,
    says why, and comes up once the directory is free."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pymilvus import MilvusClient; "
            f"c = MilvusClient({str(lite)!r}); print('open', flush=True); time.sleep(4)",
        ],
        stdout=subprocess.PIPE,
    )
    server = ml.LiteServer(lite)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"open"
        caplog.set_level(logging.WARNING, logger="streams.milvus_lite")
        uri = _served(server, timeout_s=60)
        assert holder.wait(timeout=30) == 0
        locked = [r for r in caplog.records if "open in another process" in r.getMessage()]
        assert locked, caplog.text
        assert server._failures == 0 and ml.connect_uri(unit_settings) == uri
    finally:
        holder.kill()
        server.stop()


def test_milvus_up_status_down(unit_settings: Settings, lite: Path) -> None:
    info = ml.up(unit_settings)
    try:
        assert ml.status(unit_settings) == info
        assert ml.up(unit_settings) == info  # found, not doubled
        assert ml.connect_uri(unit_settings) == info.uri
    finally:
        assert ml.down(unit_settings) == info
    assert ml.status(unit_settings) is None
    assert ml.connect_uri(unit_settings) == str(lite)


HTML = b"""<!doctype html><html><head><title>Widgets guide</title></head><body>
<main><h1>Widgets guide</h1><p>A widget is a small gadget that frobnicates sprockets.</p>
<p>To calibrate a widget, turn the knurled knob until the sprocket hums.</p></main>
</body></html>"""


@pytest.mark.kafka
def test_search_and_a_pymilvus_client_read_while_the_worker_writes(
    settings: Settings, tmp_path: Path, django_docs: Path
) -> None:
    """The default settings (Milvus Lite under home, nothing else set): while the worker
    runs, ``ops.search`` finds what it wrote and a plain ``MilvusClient`` at the address
    ``status`` prints sees the collection; after it stops, the directory opens embedded."""
    import shutil

    from pymilvus import MilvusClient

    from devtools.corpus import CorpusServer, corpus_files, subset
    from ops.search import search
    from tests.helpers import Worker, baseline, milvus_rows, publish_urls, wait_for

    assert settings.milvus_is_lite and not settings.milvus_uri
    site = tmp_path / "site"
    for src in subset(corpus_files(django_docs), 3):
        dst = site / src.relative_to(django_docs)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    (site / "widgets.html").write_bytes(HTML)
    files = corpus_files(site) + [site / "widgets.html"]
    with CorpusServer(site) as server:
        base = baseline(settings)
        worker = Worker(settings)
        try:
            publish_urls(settings, [server.url_of(p) for p in files])
            snap = wait_for(settings, base, len(files), worker)
            assert snap.dead == {}, snap
            t0 = time.monotonic()
            result = search(settings, "how do I calibrate a widget", 3)
            hits = result.hits
            search_s = time.monotonic() - t0
            assert hits and "knurled knob" in hits[0].text, hits
            from ops.status import milvus_where  # after the search: the property comes first

            where = milvus_where(settings)
            assert where.served is not None and where.uri.startswith("http://127.0.0.1:")
            client = MilvusClient(where.uri)
            try:
                assert client.has_collection(settings.collection)
                client.load_collection(settings.collection)
                rows = client.query(settings.collection, filter="", output_fields=["count(*)"])
                assert rows[0]["count(*)"] == snap.written
            finally:
                client.close()
            assert worker.alive(), worker.tail()
            print(f"search while the worker runs: {search_s:.2f} s at {where.uri}")
        finally:
            worker.stop()
    lite = ml.lite_dir(settings)
    assert lite is not None and not ml.server_file(lite).exists()
    assert ml.connect_uri(settings) == str(lite)
    assert len(milvus_rows(settings)) == snap.written  # embedded again, lock released
