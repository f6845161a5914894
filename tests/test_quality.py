"""The retrieval-quality bench (``python -m bench quality``): its metrics, its relevance rule,
its query sets, and a tiny end-to-end run with a fake model and an in-memory index (no model,
no Milvus: the fast tier)."""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from bench import quality
from bench.quality import (
    QUERY_DIR,
    CorpusPage,
    Outcome,
    Query,
    QuerySet,
    choose_files,
    evaluate,
    first_relevant,
    is_relevant,
    load_queries,
    mrr_at,
    normalize,
    recall_at,
    regressions,
)
from streams.chunking import Chunker
from streams.messages import Chunk

DJANGO = QUERY_DIR / "django.jsonl"
#: RST markup a key must not contain: keys are plain words copied from the prose.
MARKUP = re.compile(r"[`*:|<>_\[\]=#~^\\]")


def q(key: str, file: str = "a.txt", qid: str = "q1") -> Query:
    return Query(qid, "a question?", file, key)


# --- metrics -----------------------------------------------------------------------------


def test_recall_at_k_counts_questions_answered_within_k() -> None:
    ranks = [1, 3, None, 7, 2]
    assert recall_at(ranks, 1) == pytest.approx(1 / 5)
    assert recall_at(ranks, 5) == pytest.approx(3 / 5)
    assert recall_at(ranks, 10) == pytest.approx(4 / 5)
    assert recall_at([], 5) == 0.0


def test_mrr_at_10_is_the_mean_reciprocal_rank_with_misses_and_deep_hits_as_zero() -> None:
    assert mrr_at([1, 2, None, 4]) == pytest.approx((1 + 1 / 2 + 0 + 1 / 4) / 4)
    assert mrr_at([11, 1]) == pytest.approx(0.5)  # rank 11 is past the cut-off
    assert mrr_at([3], k=2) == 0.0
    assert mrr_at([]) == 0.0


# --- relevance ---------------------------------------------------------------------------


def test_normalize_drops_case_markup_and_line_breaks() -> None:
    assert normalize("Whether to use a *secure*\n   cookie for the ``CSRF`` cookie.") == (
        "whether to use a secure cookie for the csrf cookie"
    )
    assert normalize('Rhymes with FANG-oh. The "D" is silent') == (
        "rhymes with fang oh the d is silent"
    )
    assert normalize("  \n") == ""


def test_a_chunk_is_relevant_when_from_the_file_and_holding_the_whole_key() -> None:
    query = q("the cookie is only sent with an HTTPS connection")
    text = "marked as &quot;secure&quot;, which means the\ncookie is only sent with an HTTPS"
    text += " connection."
    assert is_relevant("a.txt", text, query)
    assert not is_relevant("b.txt", text, query)  # the phrase on another page does not answer
    assert not is_relevant("a.txt", "the cookie is only sent with an", query)  # cut apart
    assert not is_relevant("a.txt", "xthe cookie is only sent with an HTTPS connectionx", query)


def test_first_relevant_is_the_rank_of_the_first_relevant_hit() -> None:
    query = q("one two three four five six")
    hits = [
        ("b.txt", "one two three four five six"),
        ("a.txt", "nothing"),
        ("a.txt", "One, two; three four five six!"),
    ]
    assert first_relevant(hits, query) == 3
    assert first_relevant(hits[:2], query) is None


# --- the query sets ----------------------------------------------------------------------


def test_the_django_query_set_is_well_formed() -> None:
    queries = load_queries(DJANGO)
    assert len(queries) >= 60
    assert len({x.id for x in queries}) == len(queries), "ids must be unique"
    assert len({x.file for x in queries}) >= 30, "questions spread over many pages"
    assert sum(x.file.startswith("faq/") for x in queries) >= 10
    for x in queries:
        words = len(x.norm_key.split())
        assert 6 <= words <= 20, (x.id, words)
        assert not MARKUP.search(x.key), (x.id, x.key)
        assert x.question.strip() and x.question != x.key
        assert x.norm_key not in normalize(x.question), f"{x.id}: the question copies its key"
    for line in DJANGO.read_text(encoding="utf-8").splitlines():
        assert set(json.loads(line)) == {"id", "question", "file", "key"}


def test_every_django_key_is_verbatim_and_unique_in_its_file(django_docs: Path) -> None:
    for x in load_queries(DJANGO):
        raw = (django_docs / x.file).read_text(encoding="utf-8")
        assert " ".join(x.key.split()) in " ".join(raw.split()), f"{x.id}: not verbatim in {x.file}"
        assert normalize(raw).count(x.norm_key) == 1, f"{x.id}: key not exactly once in {x.file}"


@pytest.mark.slow
def test_every_django_key_survives_the_html_rendering(django_docs: Path) -> None:
    """The HTML set asks the same questions: every key must be in its rendered page's text."""
    from bs4 import BeautifulSoup

    from bench.rst_html import render_html

    queries = load_queries(DJANGO)
    for file in sorted({x.file for x in queries}):
        html = render_html((django_docs / file).read_text(encoding="utf-8"))
        text = normalize(BeautifulSoup(html, "html.parser").get_text(" "))
        for x in queries:
            if x.file == file:
                assert x.norm_key in text, f"{x.id}: lost in the HTML of {file}"


def test_load_queries_names_a_line_without_a_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "x", "question": "q", "file": "a.txt"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing 'key'"):
        load_queries(path)


def test_choose_files_keeps_the_answering_pages_and_is_seeded() -> None:
    files = [f"p{i:03}.txt" for i in range(50)]
    queries = [q("k k k k k k", "p007.txt"), q("k k k k k k", "p031.txt", "q2")]
    chosen = choose_files(files, queries, 10, seed=1)
    assert len(chosen) == 10 and {"p007.txt", "p031.txt"} <= set(chosen)
    assert chosen == choose_files(files, queries, 10, seed=1)
    assert chosen != choose_files(files, queries, 10, seed=2)
    assert choose_files(files, queries, None, seed=1) == files
    with pytest.raises(ValueError, match="not in the corpus"):
        choose_files(files, [q("k k k k k k", "missing.txt")], 10, seed=1)


# --- a tiny end-to-end run ---------------------------------------------------------------


def word_chunker(max_tokens: int = 24, overlap: int = 4) -> Chunker:
    """A real ``Chunker`` on a whitespace word tokenizer: no model files needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return Chunker(tok, max_tokens, overlap)


class BagOfWords:
    """A fake model: hashed word counts, L2-normalised, so shared words mean similarity."""

    name = "fake-bow"

    def __init__(self) -> None:
        self.calls: list[int] = []

    def vectors(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(len(texts))
        out = np.zeros((len(texts), 1024), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in normalize(text).split():
                out[i, zlib.crc32(word.encode()) % 1024] += 1
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms == 0, 1, norms)


class MemoryIndex:
    """Brute-force cosine search: the harness's index contract without Milvus."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str]] = []
        self.dense = np.zeros((0, 1024), dtype=np.float32)

    def modes(self) -> list[str]:
        return ["dense"]

    def add(self, chunks: Sequence[Chunk], dense: np.ndarray, model: str) -> None:
        self.rows += [(c.url, c.text or "") for c in chunks]
        self.dense = np.vstack([self.dense, dense])

    def search(self, query: str, dense: np.ndarray, mode: str, k: int) -> list[tuple[str, str]]:
        order = np.argsort(-(self.dense @ dense), kind="stable")[:k]
        return [self.rows[i] for i in order]

    def close(self) -> None:
        pass


PAGES = {
    "faq/cookies.txt": "Cookies\n=======\n\nWhether to use a secure cookie for the session. "
    "If true, browsers send the cookie only over HTTPS connections.\n",
    "faq/ponies.txt": "Ponies\n======\n\nDjango is named after a jazz guitarist from the "
    "1930s. Rhymes with FANG-oh, the D is silent.\n",
    "ref/cache.txt": "Caching\n=======\n\nThe per-site cache stores every page. "
    + "Filler words about memory and disks. " * 30
    + "\n\nThe cache timeout is in seconds and defaults to five minutes.\n",
}


def test_harness_end_to_end_on_three_pages_with_a_fake_model() -> None:
    chunker = word_chunker()
    pages = [
        CorpusPage(f, quality.BASE_URL + f, text.encode(), "text/plain; charset=utf-8")
        for f, text in PAGES.items()
    ]
    queries = [
        Query(
            "c",
            "is the session cookie secure over HTTPS",
            "faq/cookies.txt",
            "browsers send the cookie only over HTTPS connections",
        ),
        Query(
            "p",
            "who is django named after, a jazz guitarist?",
            "faq/ponies.txt",
            "Django is named after a jazz guitarist",
        ),
        Query(
            "t",
            "cache timeout: how many seconds, five minutes by default?",
            "ref/cache.txt",
            "The cache timeout is in seconds and defaults to five minutes",
        ),
        Query(
            "x", "unanswerable zebra question", "ref/cache.txt", "this phrase is on no page at all"
        ),
    ]
    qset = QuerySet("tiny", queries, pages, {})
    model = BagOfWords()
    [outcome] = evaluate(qset, "flat", quality.flat_chunks(chunker), chunker, model, MemoryIndex)
    assert outcome.pages == 3 and outcome.questions == 4
    assert outcome.chunks >= 4  # the cache page is cut into several chunks
    assert outcome.over_budget == 0
    assert outcome.ranks["c"] == 1 and outcome.ranks["p"] == 1 and outcome.ranks["t"] == 1
    assert outcome.missed == ["x"]
    assert outcome.recall_at_1 == pytest.approx(0.75)
    assert outcome.mrr_at_10 == pytest.approx(0.75)
    assert model.calls == [outcome.chunks, 4]  # chunks once, then the questions once
    line = outcome.to_json()
    assert "ranks" not in line and line["chunker"] == "flat" and line["tokens"] > 0


def outcome(chunker: str, ranks: dict[str, int | None], mode: str = "dense") -> Outcome:
    return Outcome("s", chunker, mode, len(ranks), 0, 0, 0, 1, 1, 1, 0, [], ranks)


def test_regressions_list_what_flat_found_and_structured_lost() -> None:
    rows = [
        outcome("flat", {"a": 1, "b": 5, "c": None, "d": 2, "e": 7}),
        outcome("structured", {"a": 1, "b": 6, "c": 1, "d": None, "e": None}),
        outcome("flat", {"a": 1}, mode="hybrid"),
    ]
    assert regressions(rows) == [("s", "dense", "b", 5, 6), ("s", "dense", "d", 2, None)]


def test_bench_dispatches_the_quality_verb(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["quality", "--help"])
    assert exc.value.code == 0
    assert "python -m bench quality" in capsys.readouterr().out
