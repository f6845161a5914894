"""PDFs: text per page as sections, titles from metadata, and hostile files refused in
bounds (encrypted, malformed, page-tree cycles and depth, a page count bomb, a stream bomb,
more text than a page may have). PDFs are made here (tests/hostile.py), never committed."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.chunking import Chunker
from streams.documents import PageLimits, chunk_document
from streams.errors import PageRefused, PageTooLarge, UnsupportedContent
from streams.extract import extract_text
from streams.pdf import MAX_PDF_PAGES, MAX_STREAM_BYTES
from streams.settings import MINILM, Settings
from tests.hostile import (
    make_pdf,
    pdf_deep_tree,
    pdf_many_pages,
    pdf_operator_bomb,
    pdf_page_cycle,
    pdf_stream_bomb,
)

URL = "https://example.org/manual"
DEADLINE_S = 3.0
#: A page of words, long enough that two pages never share a chunk.
WORDS = " ".join(f"word{i}" for i in range(50))


@pytest.mark.parametrize(
    ("content_type", "url"),
    [
        ("application/pdf", URL),
        ("application/pdf; name=x.pdf", URL),
        ("application/octet-stream", URL),  # servers that know no better: the magic says
        (None, URL),
        (None, URL + ".pdf"),
    ],
)
def test_a_pdf_is_read_page_by_page(content_type: str | None, url: str) -> None:
    body = make_pdf(["Sprockets turn widgets.\nSecond line.", "", "Gears mesh."], title="Manual")
    out = extract_text(body, content_type, url, structured=True)
    assert out.kind == "pdf"
    assert out.title == "Manual"
    assert out.text == "Sprockets turn widgets.\nSecond line.\n\nGears mesh."
    # an empty page makes no section but keeps the numbers of the pages after it true
    assert [(s.path, s.body) for s in out.sections] == [
        (("Page 1",), "Sprockets turn widgets.\nSecond line."),
        (("Page 3",), "Gears mesh."),
    ]


def test_without_title_metadata_the_first_line_titles_the_pdf() -> None:
    out = extract_text(make_pdf(["Installing\nRun the installer."]), "application/pdf", URL)
    assert out.title == "Installing"


def test_octet_stream_that_is_not_a_pdf_is_still_unsupported() -> None:
    with pytest.raises(UnsupportedContent):
        extract_text(b"\x89PNG\r\n\x1a\n", "application/octet-stream", URL)


def test_pdf_chunks_carry_their_page_in_the_path(chunker: Chunker) -> None:
    body = make_pdf([WORDS, WORDS.replace("word", "gear")], title="Field Manual")
    chunks = chunk_document(body, "application/pdf", URL, chunker)
    assert [section for section, _ in chunks] == [
        "Field Manual › Page 1",
        "Field Manual › Page 2",
    ]
    assert chunks[0][1].startswith("Field Manual › Page 1\n\nword0 word1")
    assert "gear49" in chunks[1][1]


# --- hostile PDFs ---------------------------------------------------------------------------


def refusal(body: bytes, **kw: int) -> tuple[str, str]:
    """The dead-letter class and message extracting ``body`` ends in, and within a second:
    pypdf's limits, not the extraction deadline, stop these."""
    started = time.monotonic()
    with pytest.raises((UnsupportedContent, PageTooLarge)) as info:
        extract_text(body, "application/pdf", URL, **kw)
    assert time.monotonic() - started < 2.0
    return info.value.error_class, str(info.value)


def test_an_encrypted_pdf_is_unsupported_content_saying_so() -> None:
    cls, message = refusal(make_pdf(["the secret plans"], password="hunter2"))
    assert cls == "unsupported_content"
    assert "encrypted PDF" in message


def test_an_encrypted_pdf_the_empty_password_opens_is_read() -> None:
    out = extract_text(make_pdf(["open to all"], password=""), "application/pdf", URL)
    assert out.text == "open to all"


@pytest.mark.parametrize(
    "body",
    [
        b"%PDF-1.7\n" + bytes(range(256)) * 40,
        make_pdf(["cut short"])[:300],
        b"%PDF-",
    ],
    ids=["garbage", "truncated", "magic-only"],
)
def test_a_malformed_pdf_is_unsupported_content(body: bytes) -> None:
    cls, message = refusal(body)
    assert cls == "unsupported_content"
    assert "unreadable PDF" in message


def test_a_page_tree_cycle_is_refused() -> None:
    cls, _ = refusal(pdf_page_cycle())
    assert cls == "unsupported_content"


def test_a_deep_page_tree_is_refused() -> None:
    cls, message = refusal(pdf_deep_tree(5000))
    assert (cls, "depth" in message) == ("too_large", True)


def test_more_pages_than_the_cap_is_too_large() -> None:
    assert extract_text(pdf_many_pages(50), "application/pdf", URL).text.count("hostile") == 50
    body = pdf_many_pages(MAX_PDF_PAGES + 5)  # about 60 KB for 10,005 pages
    assert len(body) < 100_000
    cls, message = refusal(body)
    assert cls == "too_large"
    assert f"more than {MAX_PDF_PAGES} pages" in message


def test_a_stream_that_inflates_past_the_cap_is_too_large() -> None:
    mib = 2 * MAX_STREAM_BYTES // (1024 * 1024)  # under pypdf's own 75 MB default
    body = pdf_stream_bomb(mib)
    assert len(body) < 100_000
    cls, message = refusal(body)
    assert (cls, "decompressing" in message) == ("too_large", True)
    assert extract_text(pdf_stream_bomb(1), "application/pdf", URL).text == "bomb"


def test_pdf_text_past_the_character_limit_is_too_large() -> None:
    body = make_pdf([WORDS] * 60)
    assert len(extract_text(body, "application/pdf", URL).text) > 20_000
    cls, message = refusal(body, max_chars=10_000)
    assert cls == "too_large"
    assert "by page" in message  # stopped on the way, not after reading every page


_SEED_PDFS = (
    make_pdf(["Sprockets turn widgets.", "Gears mesh."], title="Manual"),
    make_pdf(["x"], password="pw"),
    pdf_page_cycle(),
    pdf_stream_bomb(1),
)


@settings(max_examples=150, deadline=None, database=None)
@given(
    seed=st.sampled_from(_SEED_PDFS),
    edits=st.lists(
        st.tuples(st.integers(min_value=0), st.binary(min_size=0, max_size=8)),
        min_size=1,
        max_size=6,
    ),
)
def test_a_mangled_pdf_is_read_or_refused_never_anything_else(
    seed: bytes, edits: list[tuple[int, bytes]]
) -> None:
    """Bytes of real and hostile PDFs overwritten at random: the text comes out or the page
    is refused with a documented class; no other exception leaves extraction (it would be an
    ``extract`` dead letter with a traceback: the fuzz test's rule, tests/test_fuzz.py)."""
    body = bytearray(seed)
    for at, data in edits:
        i = at % len(body)
        body[i : i + len(data)] = data
    try:
        extract_text(bytes(body), "application/pdf", URL, structured=True)
    except PageRefused as exc:
        assert exc.error_class in ("unsupported_content", "too_large"), exc


# --- through the extraction child (its deadline and its answer's classes) --------------------


@pytest.mark.slow  # a child process loads the tokenizer
def test_the_extraction_pool_chunks_a_pdf_and_stops_hostile_ones(chunker: Chunker) -> None:
    """In the extraction child: a PDF's chunks, an encrypted one's class, and a slow one
    (a million text operators, ~20 s of pypdf, within every size limit) killed at the
    deadline, the next PDF served by a fresh child."""
    from agents.extractor import ExtractPool
    from streams.errors import ExtractTimeout

    config = Settings(model=MINILM, extract_deadline_s=DEADLINE_S, extract_workers=1)

    async def main() -> None:
        pool = ExtractPool(config, chunker)
        await pool.start()
        try:
            body = make_pdf([WORDS], title="Field Manual")
            chunks = await pool.page_chunks(URL, body, "application/pdf")
            assert [c.section for c in chunks] == ["Field Manual › Page 1"]
            assert chunks[0].title == "Field Manual"
            with pytest.raises(UnsupportedContent) as info:
                await pool.page_chunks(URL, make_pdf(["x"], password="pw"), "application/pdf")
            assert "encrypted PDF" in str(info.value)
            with pytest.raises(PageTooLarge):
                await pool.page_chunks(URL, pdf_many_pages(MAX_PDF_PAGES + 1), None)
            slow = pdf_operator_bomb(1_000_000)
            assert len(slow) < 20_000
            started = time.monotonic()
            with pytest.raises(ExtractTimeout):
                await pool.page_chunks(URL, slow, "application/pdf")
            assert time.monotonic() - started < DEADLINE_S + 3.0
            again = await pool.page_chunks(URL, body, "application/pdf")
            assert [c.text for c in again] == [c.text for c in chunks]
        finally:
            await pool.aclose()

    asyncio.run(main())


def test_page_limits_reach_pdfs(chunker: Chunker) -> None:
    """The same PageLimits as any page: a PDF over the chunk cap is refused too."""
    from streams.errors import TooManyChunks

    body = make_pdf([WORDS] * 3, title="T")
    assert len(chunk_document(body, "application/pdf", URL, chunker)) == 3
    with pytest.raises(TooManyChunks):
        chunk_document(body, "application/pdf", URL, chunker, limits=PageLimits(chunks=2))
