"""Structure before chunking (streams/structure.py): sections and heading paths of
reStructuredText, Markdown, HTML and plain text, and chunks cut by section.

The parser tests are pure (fast tier); the packing tests measure with the real MiniLM
tokenizer (``chunker`` fixture) and are marked slow, as tests/test_chunking.py is.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.chunking import Chunker
from streams.documents import PageLimits, chunk_document, page_chunks
from streams.errors import TooManyChunks
from streams.extract import extract_text
from streams.structure import (
    PACK_SHARE,
    PATH_SEPARATOR,
    Section,
    chunk_sections,
    page_path,
    parse_markdown,
    parse_plain,
    parse_rst,
    rst_inline,
)

URL = "https://docs.example.org/page"
slow = pytest.mark.slow


def paths(sections: list[Section]) -> list[tuple[str, ...]]:
    return [s.path for s in sections]


def bodies(sections: list[Section]) -> str:
    return "\n\n".join(s.body for s in sections)


# --- reStructuredText -----------------------------------------------------------------------

RST = """\
=====
Guide
=====

Intro text.

Models
======

About models.

Field options
-------------

``null``
~~~~~~~~

If ``True``, store NULL.

Field types
-----------

Many types.

Queries
=======

Ask the database.
"""


def test_rst_sections_and_paths() -> None:
    got = parse_rst(RST)
    assert paths(got) == [
        ("Guide",),
        ("Guide", "Models"),
        ("Guide", "Models", "Field options", "null"),
        ("Guide", "Models", "Field types"),
        ("Guide", "Queries"),
    ]
    assert [s.body for s in got] == [
        "Intro text.",
        "About models.",
        "If True, store NULL.",
        "Many types.",
        "Ask the database.",
    ]


def test_rst_levels_follow_first_appearance_of_any_adornment() -> None:
    text = "Top\n###\n\nA\n+++\n\na\n\nB\n+++\n\nb\n\nB1\n'''\n\nb1\n"
    assert paths(parse_rst(text)) == [("Top", "A"), ("Top", "B"), ("Top", "B", "B1")]


def test_rst_heading_markup_is_structure_not_text() -> None:
    got = parse_rst(RST)
    for s in got:
        assert not re.search(r"([=\-~])\1{3,}", s.body), s.body


def test_rst_a_short_rule_after_words_is_not_a_title() -> None:
    text = "Some words here\n---\n\nmore"
    got = parse_rst(text)
    assert paths(got) == [()]
    assert got[0].body == "Some words here\n\nmore"


def test_rst_a_line_inside_a_paragraph_is_not_a_title() -> None:
    got = parse_rst("first line\nsecond line\n===========\n\nafter")
    assert paths(got) == [()] and "second line" in got[0].body


def test_rst_transitions_and_a_page_of_underlines_leave_no_markup() -> None:
    assert parse_rst("para one\n\n----------\n\npara two")[0].body == "para one\n\npara two"
    assert parse_rst(("=" * 80 + "\n") * 1000) == []
    assert parse_rst("\n".join("-=~^"[i % 4] * 60 for i in range(1000))) == []


def test_rst_a_page_of_headings_keeps_them_as_text() -> None:
    got = parse_rst("Title\n=====\n\nSub\n---\n")
    assert got == [Section((), "Title\nSub")]


def test_rst_code_block_keeps_its_content_and_drops_the_directive() -> None:
    text = (
        "Run this:\n\n.. code-block:: python\n   :linenos:\n\n    # not a heading\n"
        "    def f():\n        return 1\n\nAfter."
    )
    body = parse_rst(text)[0].body
    assert body == "Run this:\n\n# not a heading\ndef f():\n    return 1\n\nAfter."


def test_rst_literal_blocks_are_code() -> None:
    body = parse_rst("Like this::\n\n    x = 1\n    ``y``\n\nAnd ::\n\n    z\n\nEnd.")[0].body
    assert body == "Like this:\n\nx = 1\n``y``\n\nAnd\n\nz\n\nEnd."


def test_rst_directives_become_readable_text() -> None:
    text = """\
.. _common-options:

.. note::

    Fields live in :mod:`django.db.models.fields`.

.. versionadded:: 5.0

    The ``db_default`` option.

.. versionchanged:: 4.2 Now async.

.. attribute:: Field.null
   :noindex:

   If true.

.. toctree::
   :maxdepth: 2

   intro/index

.. index:: pair: models; fields

..
   A comment that
   spans lines.

.. |br| raw:: html

   <br>

.. module:: django.db.models.fields
   :synopsis: Built-in field types.
"""
    body = parse_rst(text)[0].body
    assert body == (
        "Note:\n\nFields live in django.db.models.fields.\n\n"
        "New in version 5.0:\n\nThe db_default option.\n\n"
        "Changed in version 4.2: Now async.\n\n"
        "Field.null\n\nIf true.\n\n"
        "django.db.models.fields\nBuilt-in field types."
    )
    assert "common-options" not in body and "toctree" not in body and "comment" not in body


@pytest.mark.parametrize(
    ("markup", "text"),
    [
        (":class:`~django.db.models.Model`", "Model"),
        (":class:`django.db.models.Model`", "django.db.models.Model"),
        (":meth:`~.QuerySet.filter()`", "filter()"),
        (":doc:`the tutorial </intro/tutorial01>`", "the tutorial"),
        (":ref:`<topics-db-models>`", "topics-db-models"),
        (":py:class:`!Unlinked`", "Unlinked"),
        ("``code``", "code"),
        ("`Django <https://djangoproject.com>`_", "Django"),
        ("`the wiki page`_", "the wiki page"),
        ("**bold**", "bold"),
        (":mod:`schema migrations\n<django.db.migrations>`", "schema migrations"),
    ],
)
def test_rst_roles_and_inline_markup(markup: str, text: str) -> None:
    assert rst_inline(f"See {markup} here.") == f"See {text} here."


def test_rst_roles_spanning_lines_in_a_paragraph() -> None:
    body = parse_rst("Look at :mod:`schema migrations\n<django.db.migrations>` now.")[0].body
    assert body == "Look at schema migrations now."


def test_rst_tables_keep_rows_without_borders() -> None:
    grid = "+-----+-----+\n| a   | b   |\n+=====+=====+\n| 1   | 2   |\n+-----+-----+"
    assert parse_rst(grid)[0].body == "| a   | b   |\n| 1   | 2   |"
    simple = "=====  =====\ncol 1  col 2\n=====  =====\n1      2\n=====  ====="
    assert parse_rst(simple)[0].body == "col 1  col 2\n1      2"


def test_rst_overline_titles_and_titles_with_markup() -> None:
    got = parse_rst("==================\n``QuerySet`` API\n==================\n\nBody.")
    assert got == [Section(("QuerySet API",), "Body.")]


# --- Markdown -------------------------------------------------------------------------------

MD = """\
---
title: front matter
tags: [a, b]
---

# Guide

Intro with a [link](https://example.org) and `code`.

## Install

```bash
# not a heading
pip install thing
```

Setext Section
--------------

- one
- two

| a | b |
|---|:-:|
| 1 | 2 |

### Deep ###

Deep text.

Other Top
=========

Last.
"""


def test_markdown_sections_and_paths() -> None:
    got = parse_markdown(MD)
    assert paths(got) == [
        ("Guide",),
        ("Guide", "Install"),
        ("Guide", "Setext Section"),
        ("Guide", "Setext Section", "Deep"),
        ("Other Top",),
    ]
    assert got[0].body == "Intro with a link and code."
    assert got[1].body == "# not a heading\npip install thing"
    assert got[2].body == "- one\n- two\n\n| a | b |\n| 1 | 2 |"
    assert "front matter" not in bodies(got)


def test_markdown_hash_inside_any_fence_is_code() -> None:
    text = "# A\n\n~~~~\n# code\n```\n# still code\n~~~~\n\n## B\n\nb"
    got = parse_markdown(text)
    assert paths(got) == [("A",), ("A", "B")]
    assert got[0].body == "# code\n```\n# still code"


def test_markdown_an_unclosed_fence_runs_to_the_end() -> None:
    got = parse_markdown("# A\n\n```\n# x\n## y")
    assert got == [Section(("A",), "# x\n## y")]


def test_markdown_rules_are_not_setext_after_a_blank_line() -> None:
    got = parse_markdown("para\n\n---\n\nmore")
    assert got == [Section((), "para\n\nmore")]


# --- plain text and HTML ----------------------------------------------------------------------


def test_plain_text_is_one_section() -> None:
    assert parse_plain("a\n=====\nb") == [Section((), "a\n=====\nb")]
    assert parse_plain("  \n") == []


HTML = """<html><head><title>Models | Example Docs</title></head><body>
<nav><a href="/">Home</a><h2>Menu</h2></nav>
<main>
  <h1>Models</h1><p>Intro.</p>
  <h2>Fields <a class="headerlink" href="#f">¶</a></h2><p>About fields.</p>
  <h3>null</h3><p>Store NULL.</p><pre><code># a comment
x = 1</code></pre>
  <h2>Meta</h2><ul><li>one</li><li>two</li></ul>
  <table><tr><th>a</th><th>b</th></tr><tr><td>1</td><td>2</td></tr></table>
</main>
<footer><h2>Footer</h2></footer>
</body></html>"""


def test_html_headings_give_the_path() -> None:
    got = extract_text(HTML.encode(), "text/html", URL, structured=True)
    assert paths(list(got.sections)) == [
        ("Models",),
        ("Models", "Fields"),
        ("Models", "Fields", "null"),
        ("Models", "Meta"),
    ]
    assert [s.body for s in got.sections] == [
        "Intro.",
        "About fields.",
        "Store NULL.\n\n# a comment\nx = 1",
        "one\ntwo\n\na b\n1 2",
    ]
    # The flat text is what it was: headings included, same blocks.
    assert got.text == extract_text(HTML.encode(), "text/html", URL).text
    assert got.text.startswith("Models\n\nIntro.\n\nFields\n\nAbout fields.")


def test_text_flavors_are_parsed_when_structured() -> None:
    got = extract_text(RST.encode(), "text/x-rst", URL, structured=True)
    assert got.flavor == "rst" and got.sections[0] == Section(("Guide",), "Intro text.")
    assert extract_text(RST.encode(), "text/x-rst", URL).sections == ()
    md = extract_text(b"# T\n\nx", None, "https://x.org/README.md", structured=True)
    assert md.sections == (Section(("T",), "x"),)


def test_page_path_puts_the_title_first_once() -> None:
    assert page_path("Models | Example Docs", ("Models", "Fields")) == ("Models", "Fields")
    assert page_path("Guide", ("Install",)) == ("Guide", "Install")
    assert page_path("Guide", ()) == ("Guide",)
    assert page_path(None, ()) == ()


# --- hostile input: linear time ---------------------------------------------------------------


def _hostile_texts() -> dict[str, str]:
    line = "x" * 4_000_000
    return {
        "a 4 MB line": line,
        "a 4 MB line of roles": ":a:`b` " * 550_000,
        "a 4 MB line of unclosed markup": ":a:a:a:`" * 500_000,
        "a 4 MB line of brackets": "[x](" * 1_000_000,
        "100k headings": "".join(f"H{i}\n{'=-~^'[i % 4] * 5}\n\nb{i}\n\n" for i in range(100_000)),
        "100k markdown headings": "".join(f"{'#' * (1 + i % 6)} h{i}\n" for i in range(100_000)),
        "only underlines": ("=" * 100 + "\n") * 40_000,
        "deep indentation": "".join(" " * (i % 100) + ".. note::\n" for i in range(200_000)),
        "nested directives": "".join(" " * i + f".. d{i}::\n" for i in range(100)) * 2000,
        "unclosed fences": "```\n" * 1_000_000,
    }


@pytest.mark.parametrize("name", sorted(_hostile_texts()))
def test_hostile_pages_parse_in_bounded_time(name: str) -> None:
    text = _hostile_texts()[name]
    for parse in (parse_rst, parse_markdown):
        start = time.perf_counter()
        got = parse(text)
        took = time.perf_counter() - start
        assert took < 15, f"{parse.__name__} took {took:.1f}s on {name}"
        assert sum(len(s.body) for s in got) <= len(text)
        assert all(len(PATH_SEPARATOR.join(s.path)) <= 200 * 64 for s in got)


# --- chunks by section (the real tokenizer) ---------------------------------------------------


def _sections_text(chunks: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``(path line, body)`` of each chunk."""
    out = []
    for section, text in chunks:
        head, _, body = text.partition("\n\n")
        assert head == section
        out.append((head, body))
    return out


@slow
def test_small_sections_of_one_parent_share_a_chunk_under_it(chunker: Chunker) -> None:
    got = chunk_document(RST, "text/x-rst", URL, chunker)
    assert len(got) == 1
    section, text = got[0]
    assert section == "Guide"
    assert text == (
        "Guide\n\nIntro text.\n\nModels\nAbout models.\n\n"
        "Models › Field options › null\nIf True, store NULL.\n\n"
        "Models › Field types\nMany types.\n\nQueries\nAsk the database."
    )


@slow
def test_a_long_section_is_cut_under_its_path_within_budget(chunker: Chunker) -> None:
    para = " ".join(f"Sentence number {i} says something about fields." for i in range(20))
    text = "Guide\n=====\n\nShort intro.\n\nFields\n------\n\n" + "\n\n".join([para] * 6)
    got = chunk_document(text, "text/x-rst", URL, chunker)
    assert got[0] == ("Guide", "Guide\n\nShort intro.")
    rest = got[1:]
    assert len(rest) > 3
    for section, chunk in rest:
        assert section == "Guide › Fields"
        assert chunk.startswith("Guide › Fields\n\nSentence number")
    counts = chunker.count_tokens([c for _, c in got])
    assert max(counts) <= chunker.max_tokens
    assert max(counts[1:]) > chunker.max_tokens * 3 // 4  # filled, not fragmented


@slow
def test_a_heading_is_never_the_end_of_a_chunk(chunker: Chunker) -> None:
    """The old chunker cut right after a heading when its answer did not fit."""
    filler = " ".join(["word"] * 200)
    text = "".join(f"Question {i}?\n{'=' * 12}\n\n{filler}\n\n" for i in range(6))
    for section, chunk in chunk_document(text, "text/x-rst", URL, chunker):
        last = chunk.rstrip().rsplit("\n", 1)[-1]
        assert not last.startswith("Question"), chunk
        assert section is not None and section.startswith("Question")
        assert chunk.startswith(section + "\n\nword")


@slow
def test_flat_strategy_is_the_old_chunker(chunker: Chunker, django_docs: Path) -> None:
    page = (django_docs / "faq" / "models.txt").read_bytes()
    flat = chunk_document(page, "text/plain", URL + ".txt", chunker, "flat")
    old = chunker.chunk(extract_text(page, "text/plain", URL + ".txt").text)
    assert flat == [(None, t) for t in old]


@slow
def test_page_chunks_carry_section_and_source(chunker: Chunker) -> None:
    got = page_chunks(URL, RST.encode(), "text/x-rst", chunker, source="webhook")
    assert [(c.section, c.source, c.title) for c in got] == [("Guide", "webhook", "Guide")]
    flat = page_chunks(URL, RST.encode(), "text/x-rst", chunker, strategy="flat")
    assert {c.section for c in flat} == {None} and "=====" in (flat[0].text or "")


@slow
def test_a_page_of_underlines_makes_no_chunks(chunker: Chunker) -> None:
    assert chunk_document(("-" * 79 + "\n") * 50_000, "text/x-rst", URL, chunker) == []


@slow
def test_100k_headings_chunk_in_bounded_time(chunker: Chunker) -> None:
    flat = "".join(f"H{i}\n======\n\nbody {i}\n\n" for i in range(100_000))
    start = time.perf_counter()
    got = chunk_document(flat, "text/x-rst", URL, chunker)
    assert time.perf_counter() - start < 30
    assert 100 < len(got) <= PageLimits().chunks  # packed: many sections a chunk
    assert max(chunker.count_tokens([c for _, c in got])) <= chunker.max_tokens
    nested = "".join(f"H{i}\n{'=-~^'[i % 4] * 6}\n\nbody {i}\n\n" for i in range(100_000))
    start = time.perf_counter()
    with pytest.raises(TooManyChunks):  # refused as soon as it is over the limit
        chunk_document(nested, "text/x-rst", URL, chunker)
    assert time.perf_counter() - start < 30


@slow
def test_hostile_lines_chunk_within_every_cap(chunker: Chunker) -> None:
    cases = [
        ("x" * 4_000_000, "text/x-rst"),
        (":a:`" + "b" * 1_000_000 + "`", "text/x-rst"),
        ("# " + "h" * 1_000_000, "text/markdown"),
        ("<h1>" + "h" * 1_000_000 + "</h1>" + "<p>x</p>" * 10, "text/html"),
    ]
    for text, flavor in cases:
        got = chunk_document(text, flavor, URL, chunker)
        assert got
        for section, chunk in got:
            assert len(chunk) <= chunker.max_chars
            assert section is None or len(section) <= 512
        assert max(chunker.count_tokens([c for _, c in got])) <= chunker.max_tokens


def _non_space(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _is_subsequence(needle: str, haystack: str) -> bool:
    it = iter(haystack)
    return all(ch in it for ch in needle)


words = st.text(
    alphabet=st.characters(codec="utf-8", categories=("L", "N")), min_size=1, max_size=12
)
headings = st.lists(words, min_size=1, max_size=4).map(" ".join)
paragraphs = st.lists(words, min_size=1, max_size=120).map(" ".join)


@slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(0, 3), headings, st.lists(paragraphs, max_size=4)), max_size=12),
    st.sampled_from([(254, 48_000, 60_000), (40, 300, 700)]),
)
def test_every_body_character_lands_in_a_chunk_within_budget(
    chunker: Chunker,
    doc: list[tuple[int, str, list[str]]],
    caps: tuple[int, int, int],
) -> None:
    tokens, chars, nbytes = caps
    small = chunker.derive(max_tokens=tokens, max_chars=chars, max_bytes=nbytes)
    text = "".join(
        f"{h}\n{'=-~^'[level] * (len(h) + 2)}\n\n" + "\n\n".join(ps) + "\n\n"
        for level, h, ps in doc
    )
    sections = parse_rst(text)
    got = chunk_sections(sections, "Page", small)
    all_text = "".join(_non_space(c) for _, c in got)
    for s in sections:
        assert _is_subsequence(_non_space(s.body), all_text)
    for section, chunk in got:
        assert chunk.startswith(section)
        assert len(chunk) <= chars and len(chunk.encode()) <= nbytes
    assert all(n <= tokens for n in small.count_tokens([c for _, c in got]))


_UNDERLINE_LINE = re.compile(r"^([=\-~^*#+'\"`])\1{3,}$", re.M)


def _title_pairs(raw: str) -> list[str]:
    """``Title\\n=====`` pairs of a reStructuredText page (title and its underline)."""
    lines = raw.split("\n")
    return [
        f"{a}\n{b}"
        for a, b in zip(lines, lines[1:], strict=False)
        if a.strip() and a[0] not in " \t" and _UNDERLINE_LINE.fullmatch(b.rstrip())
    ]


@slow
def test_django_corpus_has_no_underlines_in_chunks(chunker: Chunker, django_docs: Path) -> None:
    """Structured chunks hold no title underline; the few adornment-like lines left are
    inside code blocks (RST samples, test output). The flat chunker kept them all."""
    from devtools.corpus import corpus_files, subset

    flat_lines = structured_lines = pairs_seen = 0
    for path in subset(corpus_files(django_docs), 120):
        raw = path.read_text("utf-8")
        flat = chunk_document(raw, "text/plain", URL + ".txt", chunker, "flat")
        new = chunk_document(raw, "text/plain", URL + ".txt", chunker)
        flat_lines += sum(len(_UNDERLINE_LINE.findall(t)) for _, t in flat)
        structured_lines += sum(len(_UNDERLINE_LINE.findall(t)) for _, t in new)
        joined = "\n".join(t for _, t in new)
        for pair in _title_pairs(raw):
            pairs_seen += 1
            assert pair not in joined, (path.name, pair)
        counts = chunker.count_tokens([t for _, t in new])
        assert max(counts, default=0) <= chunker.max_tokens
        assert all(s is not None and t.startswith(s) for s, t in new)
    assert pairs_seen > 500
    assert flat_lines > 1000
    assert structured_lines * 50 < flat_lines, (structured_lines, flat_lines)


@slow
def test_page_limits_apply_to_structured_chunks(chunker: Chunker) -> None:
    text = "\n\n".join(" ".join(["word"] * 300) for _ in range(20))
    with pytest.raises(TooManyChunks):
        chunk_document(text, "text/plain", URL, chunker, limits=PageLimits(chunks=5))


@slow
def test_small_sections_pack_to_a_share_of_the_budget(chunker: Chunker) -> None:
    """An FAQ: many short answers under one parent. They share chunks (a fragment alone
    embeds worse), but a shared chunk stops at PACK_SHARE of the budget: packed to the
    whole budget, one answer was embedded among its neighbours' and lost (BENCHMARKS.md)."""
    faq = "FAQ\n===\n\n" + "".join(
        f"Question number {n} about topic {n}?\n" + "-" * 40 + "\n\n"
        f"The answer to question {n} is that topic {n} works as documented here, mostly.\n\n"
        for n in range(40)
    )
    chunks = chunk_document(faq.encode(), "text/x-rst", URL, chunker)
    packed = [t for _, t in chunks if t.count("Question number") > 1]
    assert packed, "small sections share chunks"
    limit = chunker.max_tokens * PACK_SHARE
    counts = chunker.count_tokens(packed)
    assert max(counts) <= limit * 1.05, (max(counts), limit)
    assert all("Question number" in t for _, t in chunks)  # no chunk without its heading


@slow
def test_a_plain_page_titled_by_its_first_line_reads_it_once(chunker: Chunker) -> None:
    """Plain text has no headings: its title is its first line, which the body holds
    already; the path line is not repeated above it."""
    one = chunk_document(b"A good page about sprockets.", "text/plain", URL, chunker)
    assert one == [("A good page about sprockets.", "A good page about sprockets.")]
    two = chunk_document(b"Sprockets\nThey turn widgets.", "text/plain", URL, chunker)
    assert [t for _, t in two] == ["Sprockets\nThey turn widgets."]
