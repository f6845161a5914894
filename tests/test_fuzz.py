"""Property-based: extract -> chunk -> encode over hostile bodies raises nothing undocumented.

Whatever bytes a server sends, with whatever content type and charset it claims,
``page_chunks`` either refuses the page with a documented ``PageRefused`` (its
``error_class`` becomes the dead-letter class) or returns chunks that all fit: within the
token, character and byte caps, free of control characters, and encodable as ``chunks``
messages far below Kafka's 1 MB limit that decode back to themselves. Anything else would
stop the fetch stage or loop it on one offset (issue 8).
"""

from __future__ import annotations

import codecs

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from streams.chunking import Chunker
from streams.documents import PageLimits, page_chunks
from streams.extract import (
    ExtractTimeout,
    PageRefused,
    PageTooDeep,
    PageTooLarge,
    TooManyChunks,
    UnsupportedContent,
)
from streams.messages import decode_chunk, encode_chunk

#: Loads the MiniLM tokenizer or model (seconds of imports and loading): left out of the
#: fast tier (`scripts/test.sh --fast`), run by the full suite.
pytestmark = pytest.mark.slow

URL = "https://example.org/docs/page"
#: The classes a refusal may carry: the documented ones (docs/security.md).
DOCUMENTED = {
    UnsupportedContent: "unsupported_content",
    PageTooLarge: "too_large",
    PageTooDeep: "too_deep",
    TooManyChunks: "too_many_chunks",
    ExtractTimeout: "extract_timeout",
}
#: Small caps, so that cutting, refusing and counting are exercised by small examples.
LIMITS = PageLimits(text_chars=30_000, depth=40, chunks=60)
MAX_CHARS, MAX_BYTES = 300, 700
KAFKA_MAX = 1_000_000

CHARSETS = [
    "utf-8",
    "utf-16",
    "utf-16-be",
    "iso-8859-1",
    "windows-1251",
    "shift_jis",
    "iso-2022-jp",
    "gb18030",
    "koi8-r",
    # hostile or nonsense labels: never used to decode
    "punycode",
    "idna",
    "utf-7",
    "rot13",
    "base64",
    "hex",
    "zlib",
    "bz2",
    "uu",
    "quopri",
    "raw_unicode_escape",
    "unicode_escape",
    "utf-32",
    "x-no-such-charset",
    "",
]
MIMES = [
    "text/html",
    "application/xhtml+xml",
    "text/plain",
    "text/markdown",
    "text/x-rst",
    "image/png",
    "application/octet-stream",
    None,
]
CONTROL = [chr(c) for c in (*range(0x00, 0x20), 0x7F, 0x85, 0x9B)]
WHITESPACE = [" ", "\n", "\t", "\r", "\r\n", "\u3000", "\u00a0", "\u2028", "\x0b", "\x0c"]
TAGS = ["div", "p", "span", "section", "main", "article", "pre", "ul", "li", "table", "td", "a"]


@pytest.fixture(scope="module")
def small(chunker: Chunker) -> Chunker:
    return Chunker(
        chunker.tokenizer, chunker.max_tokens, chunker.overlap, max_chars=MAX_CHARS,
        max_bytes=MAX_BYTES,
    )  # fmt: skip


def runs(alphabet: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A character repeated: the whitespace runs and giant words hostile pages are made of."""
    return st.builds(lambda c, n: c * n, alphabet, st.integers(1, 3000))


texts = st.lists(
    st.one_of(
        st.text(max_size=80),
        runs(st.sampled_from(WHITESPACE)),
        runs(st.sampled_from(["x", "\u4e2d", "\U0001f600", "=", "-", "\ud800"])),
        st.sampled_from(CONTROL),
        st.sampled_from(["Intro\n=====\n", "# Title\n", "```\ncode\n```\n", "\n\n"]),
    ),
    max_size=12,
).map("".join)


@st.composite
def html(draw: st.DrawFn) -> str:
    """Random nesting (deeper than the depth limit at times), text and whitespace runs."""
    parts: list[str] = []
    if draw(st.booleans()):
        parts.append(f"<html><head><title>{draw(texts)}</title></head><body>")
    for _ in range(draw(st.integers(0, 4))):
        tag = draw(st.sampled_from(TAGS))
        depth = draw(st.integers(0, 80))
        closed = draw(st.booleans())
        parts.append(f"<{tag}>" * depth + draw(texts) + (f"</{tag}>" * depth if closed else ""))
    return "".join(parts)


def encode(text: str, charset: str) -> bytes:
    try:
        codecs.lookup(charset)
        return text.encode(charset, errors="surrogatepass")
    except (LookupError, UnicodeError, TypeError, ValueError):
        return text.encode("utf-8", errors="surrogatepass")


bodies = st.one_of(
    st.binary(max_size=3000),
    st.builds(encode, texts, st.sampled_from(CHARSETS)),
    st.builds(encode, html(), st.sampled_from(CHARSETS)),
)
content_types = st.builds(
    lambda mime, charset: mime if mime is None or not charset else f"{mime}; charset={charset}",
    st.sampled_from(MIMES),
    st.sampled_from(CHARSETS),
)


def note(what: str) -> None:
    """Count outcomes in ``--hypothesis-show-statistics`` (outside a test: nothing)."""
    if currently_in_test_context():
        event(what)


def check_page(
    chunker: Chunker,
    body: bytes,
    content_type: str | None,
    url: str = URL,
    limits: PageLimits = LIMITS,
) -> None:
    try:
        chunks = page_chunks(url, body, content_type, chunker, limits=limits)
    except PageRefused as exc:
        assert type(exc) in DOCUMENTED, f"undocumented refusal {type(exc).__name__}: {exc}"
        assert exc.error_class == DOCUMENTED[type(exc)]
        note(f"refused: {exc.error_class}")
        return
    note("chunks" if chunks else "no text")
    texts_ = [c.text or "" for c in chunks]
    assert len(chunks) <= limits.chunks
    if texts_:
        assert max(chunker.count_tokens(texts_)) <= chunker.max_tokens
    for c in chunks:
        text = c.text or ""
        assert text and text == text.strip()
        assert len(text) <= chunker.max_chars
        assert len(text.encode("utf-8")) <= chunker.max_bytes  # strict: no lone surrogates
        assert not any(ch in text for ch in CONTROL if ch not in "\t\n"), repr(text)
        assert c.title is None or len(c.title) <= 512
        raw = encode_chunk(c)
        # every byte of the text escaped twice over, and the title: still far below 1 MB
        assert len(raw) <= 2 * chunker.max_bytes + 6 * 512 * 2 + 4096
        assert len(raw) < KAFKA_MAX
        assert decode_chunk(raw) == c


@settings(
    max_examples=250,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(body=bodies, content_type=content_types)
def test_extract_chunk_encode_raises_only_documented_errors(
    small: Chunker, body: bytes, content_type: str | None
) -> None:
    check_page(small, body, content_type)


@settings(max_examples=40, deadline=None, database=None)
@given(
    body=bodies, content_type=content_types, suffix=st.sampled_from(["", ".md", ".rst", ".html"])
)
def test_default_caps_keep_messages_under_the_broker_limit(
    chunker: Chunker, body: bytes, content_type: str | None, suffix: str
) -> None:
    check_page(chunker, body, content_type, URL + suffix, PageLimits())


@pytest.mark.parametrize(
    "body",
    [
        b" " * 1_500_000,  # the page of issue 8: one 3 MB chunks message before
        b"word" + b" " * 1_500_000 + b"word",
        b"x" * 1_500_000,  # one [UNK] token of 1.5 MB
        "\u4e2d".encode() * 300_000,
        b"\x1b" * 200_000 + b"text",  # control characters: six bytes each in JSON
    ],
)
def test_known_poison_bodies(chunker: Chunker, body: bytes) -> None:
    check_page(chunker, body, "text/plain", limits=PageLimits())
