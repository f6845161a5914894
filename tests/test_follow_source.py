"""The index follows its sources: changed, shrunk, gone and deleted pages; unchanged pages
are not re-embedded, and a partly changed page re-embeds only its changed chunks."""

from __future__ import annotations

from pathlib import Path

import pytest

from devtools.corpus import CorpusServer
from ops.progress import snapshot
from streams.ids import doc_id, normalize_url
from streams.settings import Settings
from tests.helpers import Worker, baseline, expected_index, milvus_rows, publish_urls, run, wait_for

pytestmark = pytest.mark.kafka


def paragraphs(n: int, tag: str) -> str:
    return "\n\n".join(
        f"Section {i} ({tag}). " + " ".join(f"word{i}x{j} about topic {i}" for j in range(40))
        for i in range(n)
    )


def test_index_follows_the_source(
    settings: Settings, tmp_path: Path, chunker, milvus_server
) -> None:
    settings = settings.model_copy(update={"milvus_uri": milvus_server.uri})
    site = tmp_path / "site"
    site.mkdir()
    a, b = site / "a.txt", site / "b.txt"
    a.write_text(paragraphs(12, "v1"))
    b.write_text(paragraphs(3, "b"))

    def rows_of(path: Path) -> dict[str, str]:
        did = doc_id(normalize_url(server.url_of(path)))
        return {r["id"]: r["text"] for r in milvus_rows(settings) if r["id"].startswith(did)}

    def step(urls: list[str], **kw: object) -> tuple[int, int]:
        """Publish and wait; returns (chunk messages produced, conditional 304s)."""
        base = baseline(settings)
        seen_304 = server.not_modified
        publish_urls(settings, urls, **kw)
        snap = wait_for(settings, base, len(urls), worker)
        assert snap.dead == {}
        return snap.chunks, server.not_modified - seen_304

    with CorpusServer(site) as server:
        worker = Worker(settings)
        try:
            ua, ub = server.url_of(a), server.url_of(b)
            sent, _ = step([ua, ub])
            first = expected_index(chunker, server, [a, b])
            assert sent == len(first)
            assert rows_of(a) | rows_of(b) == first
            n_a = len(rows_of(a))
            assert n_a >= 6

            # Unchanged page: a conditional GET answers 304, nothing is re-embedded.
            sent, not_modified = step([ub])
            assert (sent, not_modified) == (0, 1)

            # One paragraph in the middle changes: only the chunks whose text changed go.
            text = a.read_text().split("\n\n")
            text[6] = text[6].replace("(v1)", "(v2)")
            a.write_text("\n\n".join(text))
            new_a = expected_index(chunker, server, [a])
            changed = {k for k, v in new_a.items() if first.get(k) != v}
            assert 0 < len(changed) < len(new_a)
            sent, _ = step([ua])
            assert sent == len(changed)
            assert rows_of(a) == new_a

            # Same content, new validators (touch): fetched again, still nothing re-embedded.
            a.write_text(a.read_text())
            sent, _ = step([ua])
            assert sent == 0

            # The page shrinks: its extra chunks are deleted.
            a.write_text(paragraphs(2, "v3"))
            shrunk = expected_index(chunker, server, [a])
            assert len(shrunk) < n_a
            step([ua])
            assert rows_of(a) == shrunk

            # Gone (404): all its chunks leave the index; b is untouched.
            a.unlink()
            step([ua])
            assert rows_of(a) == {}
            assert rows_of(b) == expected_index(chunker, server, [b])

            # An explicit delete removes a page that still exists.
            step([ub], delete=True)
            assert rows_of(b) == {}
            assert run(snapshot(settings)).dead == {}
        finally:
            worker.stop()
