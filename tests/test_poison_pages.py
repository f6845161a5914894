"""A hostile page is refused or tamed within its deadline, and the pages behind it go on.

The pages of issue 8: 1.5 MB of whitespace (one 3 MB ``chunks`` message before, which the
broker refused, and the fetch stage exited on the same offset forever), 100,000 nested
``<div>`` (a quadratic parse), one 1.5 MB token. First the extraction pool alone (no broker):
its deadline kills the child, a crashed child costs one page; then the real pipeline.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from agents.extractor import ExtractPool
from devtools.corpus import CorpusServer
from streams.chunking import Chunker
from streams.documents import page_chunks
from streams.errors import ExtractTimeout, PageRefused, PageTooDeep, UnsupportedContent
from streams.ids import normalize_url
from streams.settings import MINILM, Settings
from streams.topics import URLS, stage_lags
from tests.helpers import Worker, baseline, milvus_rows, publish_urls, run, wait_for
from tests.test_deadletters import read_dlq

GOOD = b"<html><body><main><h1>Sprockets</h1><p>Sprockets turn widgets.</p></main></body></html>"
DEEP = b"<html><body>" + b"<div>" * 100_000 + b"deep" + b"</div>" * 100_000 + b"</body></html>"
WHITESPACE = b" \t\n" * 500_000  # 1.5 MB, nothing else
TABS = b"Tabs:" + b"\t" * 1_500_000 + b"end."  # one 3 MB chunks message (JSON escapes) before
ONE_TOKEN = b"x" * 1_500_000  # one WordPiece [UNK]


# --- the extraction pool (no broker) --------------------------------------------------


@pytest.mark.slow  # worker processes load the tokenizer
def test_pool_kills_an_overrunning_page_and_goes_on(chunker: Chunker) -> None:
    settings = Settings(model=MINILM, extract_deadline_s=2.0, extract_workers=1)

    async def main() -> None:
        pool = ExtractPool(settings, chunker)
        await pool.start()
        try:
            good = await pool.page_chunks("http://x.org/a", GOOD, "text/html")
            assert [c.text for c in good] == ["Sprockets\n\nSprockets turn widgets."]
            started = time.monotonic()
            with pytest.raises(ExtractTimeout) as info:
                # 100,000 nested divs: the parser alone needs far longer than 2 s
                await pool.page_chunks("http://x.org/deep", DEEP, "text/html")
            assert info.value.error_class == "extract_timeout"
            assert time.monotonic() - started < 2.0 + 3.0
            again = await pool.page_chunks("http://x.org/a", GOOD, "text/html")
            assert [c.text for c in again] == [c.text for c in good]
            with pytest.raises(UnsupportedContent):
                await pool.page_chunks("http://x.org/i.png", b"\x89PNG\r\n", "image/png")
            with pytest.raises(PageTooDeep):
                await pool.page_chunks("http://x.org/d", b"<div>" * 1000, "text/html")
            # A child that dies mid-page costs that page, not the pool.
            task = asyncio.create_task(pool.page_chunks("http://x.org/deep", DEEP, "text/html"))
            await asyncio.sleep(0.5)
            (child,) = pool._all
            os.kill(child.proc.pid, signal.SIGKILL)
            with pytest.raises(PageRefused) as died:
                await task
            assert died.value.error_class == "extract" and "died" in str(died.value)
            again = await pool.page_chunks("http://x.org/a", GOOD, "text/html")
            assert [c.text for c in again] == [c.text for c in good]
        finally:
            await pool.aclose()

    asyncio.run(main())


@pytest.mark.slow  # worker processes load the tokenizer
def test_pool_gives_what_page_chunks_gives(chunker: Chunker) -> None:
    settings = Settings(model=MINILM, extract_workers=1)
    body = ("Title\n=====\n\n" + "A sentence about widgets. " * 800).encode()

    async def main() -> list:
        pool = ExtractPool(settings, chunker)
        await pool.start()
        try:
            return await pool.page_chunks(
                "http://x.org/a.rst", body, "text/plain", fetched_at="2026-01-01T00:00:00Z"
            )
        finally:
            await pool.aclose()

    got = asyncio.run(main())
    want = page_chunks(
        "http://x.org/a.rst", body, "text/plain", chunker, fetched_at="2026-01-01T00:00:00Z"
    )
    assert len(want) > 3 and got == want


# --- the pipeline on the real broker ----------------------------------------------------


def lags(settings: Settings) -> dict[str, int]:
    return {x.stage: x.lag for x in run(stage_lags(settings))}


def poison_settings(settings: Settings, **update: object) -> Settings:
    """One ``urls`` partition (the good page waits behind the bad ones) and loopback allowed
    (the SSRF guard refuses 127.0.0.1 otherwise)."""
    update = {"url_partitions": 1, **update}
    if "fetch_allow" in Settings.model_fields:
        update["fetch_allow"] = "127.0.0.1/32"
    return settings.model_copy(update=update)


@pytest.mark.kafka
def test_whitespace_pages_never_stop_the_stage_and_the_page_behind_is_indexed(
    settings: Settings, tmp_path: Path
) -> None:
    """A page of whitespace only is a ``no_text`` dead letter (after its trim); a page with
    a 1.5 MB tab run between two words is indexed, the run collapsed to one space."""
    s = poison_settings(settings)
    site = tmp_path / "site"
    site.mkdir()
    (site / "blank.txt").write_bytes(WHITESPACE)
    (site / "tabs.txt").write_bytes(TABS)
    (site / "good.html").write_bytes(GOOD)
    with CorpusServer(site) as server:
        base = baseline(s)
        worker = Worker(s)
        try:
            blank, tabs, good = (
                server.url_of(site / n) for n in ("blank.txt", "tabs.txt", "good.html")
            )
            publish_urls(s, [blank, tabs, good])  # one partition: in this order
            (letter,) = run(read_dlq(s, URLS, 1, timeout_s=180))
            snap = wait_for(s, base, 3, worker, timeout_s=180)
            deadline = time.monotonic() + 60
            while (lag := lags(s)) != {"fetch": 0, "embed": 0, "write": 0}:
                assert time.monotonic() < deadline, lag
                time.sleep(0.5)
            assert worker.alive()
        finally:
            worker.stop()
    assert (letter.error_class, letter.url) == ("no_text", normalize_url(blank))
    assert snap.fetched == 3
    assert sorted(r["text"] for r in milvus_rows(s)) == [
        "Sprockets\n\nSprockets turn widgets.",
        "Tabs: end.",
    ]
    assert "exiting so the group redelivers" not in worker.tail(10_000)


@pytest.mark.kafka
def test_deep_and_one_token_pages_end_within_their_deadline_and_the_stage_goes_on(
    settings: Settings, tmp_path: Path
) -> None:
    deadline_s = 8.0
    s = poison_settings(settings, extract_deadline_s=deadline_s, extract_workers=1)
    site = tmp_path / "site"
    site.mkdir()
    (site / "deep.html").write_bytes(DEEP)
    (site / "token.txt").write_bytes(ONE_TOKEN)
    (site / "good.html").write_bytes(GOOD)
    (site / "warm.txt").write_bytes(b"A first page, to know the stages are up.")
    with CorpusServer(site) as server:
        worker = Worker(s)
        try:
            deep, token, good, warm = (
                server.url_of(site / n) for n in ("deep.html", "token.txt", "good.html", "warm.txt")
            )
            base = baseline(s)
            publish_urls(s, [warm])
            wait_for(s, base, 1, worker, timeout_s=240)
            base = baseline(s)
            started = time.monotonic()
            publish_urls(s, [deep, token, good])
            (letter,) = run(read_dlq(s, URLS, 1, timeout_s=180))
            refused_after = time.monotonic() - started
            snap = wait_for(s, base, 3, worker, timeout_s=240)
            assert worker.alive()
        finally:
            worker.stop()
    # Deeper than extract_max_depth: refused, or stopped by the deadline first.
    assert letter.url == normalize_url(deep)
    assert letter.error_class in {"too_deep", "extract_timeout"}, letter.error
    assert refused_after < deadline_s + 20, refused_after  # fetch, parse, produce: not minutes
    assert snap.fetched == 3
    rows = [r["text"] for r in milvus_rows(s)]  # a list: the token's pieces are alike
    assert "Sprockets\n\nSprockets turn widgets." in rows
    token_rows = [t for t in rows if t.startswith("x")]
    # One 1.5 MB token: cut into pieces within the character cap, all of it indexed.
    assert sum(len(t) for t in token_rows) == len(ONE_TOKEN)
    assert max(len(t) for t in token_rows) <= s.chunk_max_chars
    assert "exiting so the group redelivers" not in worker.tail(10_000)
