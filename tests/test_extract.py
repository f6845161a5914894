"""extract_text: main-content HTML, charsets, text formats, titles, unsupported types."""

from __future__ import annotations

import dataclasses
import re

import pytest

from streams.extract import (
    MAX_TEXT_CHARS,
    MAX_TITLE_CHARS,
    Extracted,
    PageTooDeep,
    PageTooLarge,
    UnsupportedContent,
    extract_text,
)

URL = "https://example.com/guide/page"

BLOG_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>  Writing   views | Example Docs </title>
  <style>body { color: red; } .nav { display: none }</style>
  <script>window.analytics = "TRACKING-SCRIPT";</script>
</head>
<body class="page has-sidebar">
  <header class="site-header">
    <h1 class="logo">EXAMPLE-LOGO</h1>
    <nav><ul><li><a href="/">NAV-HOME</a></li><li><a href="/docs">NAV-DOCS</a></li></ul></nav>
  </header>
  <div id="cookie-consent">COOKIE-NOTICE we use cookies <button>ACCEPT-BUTTON</button></div>
  <div class="breadcrumbs"><a href="/">Home</a> &gt; <a href="/guide">BREADCRUMB-GUIDE</a></div>
  <div class="layout">
    <aside><h3>SIDEBAR-ASIDE</h3><ul><li><a href="/x">Related X</a></li></ul></aside>
    <div class="sidebar-left"><a href="/a">SIDEBAR-CLASS-LINK</a> <a href="/b">Other</a></div>
    <div class="content">
      <h1>Writing views<a class="headerlink" href="#writing-views">\u00b6</a></h1>
      <p>A view function, or <em>view</em> for short, is a Python function
         that takes a web request and returns a web response.</p>
      <p>This response can be the HTML contents of a web page.</p>
      <h2>A simple view</h2>
      <ul>
        <li>First item</li>
        <li>Second <b>bold</b> item</li>
      </ul>
      <pre>def current_datetime(request):
    now = datetime.datetime.now()
    return HttpResponse(now)</pre>
      <div role="navigation">ROLE-NAV prev | next</div>
      <form action="/search"><input name="q"><label>SEARCH-FORM</label></form>
      <iframe src="https://ads.example.com">IFRAME-AD</iframe>
      <svg><text>SVG-TEXT</text></svg>
      <noscript>NOSCRIPT-TEXT</noscript>
    </div>
  </div>
  <footer class="site-footer"><p>FOOTER-COPYRIGHT 2024</p><nav>FOOTER-NAV</nav></footer>
  <div role="contentinfo">CONTENTINFO-TEXT</div>
  <script>console.log("BODY-SCRIPT")</script>
</body>
</html>
"""

BOILERPLATE_MARKERS = [
    "TRACKING-SCRIPT",
    "color: red",
    "EXAMPLE-LOGO",
    "NAV-HOME",
    "NAV-DOCS",
    "COOKIE-NOTICE",
    "ACCEPT-BUTTON",
    "BREADCRUMB-GUIDE",
    "SIDEBAR-ASIDE",
    "SIDEBAR-CLASS-LINK",
    "ROLE-NAV",
    "SEARCH-FORM",
    "IFRAME-AD",
    "SVG-TEXT",
    "NOSCRIPT-TEXT",
    "FOOTER-COPYRIGHT",
    "FOOTER-NAV",
    "CONTENTINFO-TEXT",
    "BODY-SCRIPT",
    "\u00b6",
]


def test_html_keeps_main_text_and_drops_boilerplate() -> None:
    got = extract_text(BLOG_PAGE.encode("utf-8"), "text/html; charset=utf-8", URL)
    assert got.kind == "html"
    assert got.title == "Writing views | Example Docs"
    for marker in BOILERPLATE_MARKERS:
        assert marker not in got.text, marker
    assert got.text == (
        "Writing views\n\n"
        "A view function, or view for short, is a Python function that takes a web request "
        "and returns a web response.\n\n"
        "This response can be the HTML contents of a web page.\n\n"
        "A simple view\n\n"
        "First item\n"
        "Second bold item\n\n"
        "def current_datetime(request):\n"
        "    now = datetime.datetime.now()\n"
        "    return HttpResponse(now)"
    )


def test_html_prefers_main_element() -> None:
    html = (
        "<html><body><div>OUTSIDE-MAIN intro text</div>"
        "<main><h1>Inside</h1><p>Main body text.</p></main>"
        "<div>OUTSIDE-AFTER</div></body></html>"
    )
    got = extract_text(html.encode(), "text/html", URL)
    assert got.text == "Inside\n\nMain body text."
    assert got.title == "Inside"  # no <title>: the first <h1>


def test_html_role_main_and_single_article() -> None:
    role = "<body><p>OUT</p><div role='main'><p>Role main text.</p></div></body>"
    assert extract_text(role.encode(), "text/html", URL).text == "Role main text."
    article = "<body><p>OUT</p><article><p>Article text.</p></article><p>OUT2</p></body>"
    assert extract_text(article.encode(), "text/html", URL).text == "Article text."
    # several articles (a listing page): all of them, from <body>
    many = "<body><article><p>One.</p></article><article><p>Two.</p></article></body>"
    assert extract_text(many.encode(), "text/html", URL).text == "One.\n\nTwo."


def test_html_article_header_is_content_site_header_is_not() -> None:
    html = (
        "<body><header><p>SITE-BANNER</p></header><article>"
        "<header><h1>Post title</h1><p>By Ada</p></header><p>Post body.</p>"
        "<footer>POST-FOOTER tags</footer></article></body>"
    )
    got = extract_text(html.encode(), "text/html", URL)
    assert got.text == "Post title\n\nBy Ada\n\nPost body."
    assert got.title == "Post title"


def test_html_class_wrapper_holding_the_content_survives() -> None:
    # "has-sidebar" / "nav-open" on wrappers must not delete the article with them.
    prose = "Plain prose sentence number {} of the real article. "
    html = (
        "<body><div class='wrapper nav-open has-sidebar'>"
        f"<p>{''.join(prose.format(i) for i in range(20))}</p>"
        "<ul class='menu'><li><a href='/1'>MENU-ONE</a></li><li><a href='/2'>MENU-TWO</a></li>"
        "</ul></div></body>"
    )
    got = extract_text(html.encode(), "text/html", URL)
    assert "Plain prose sentence number 0 of the real article." in got.text
    assert "number 19 of the real article." in got.text
    assert "MENU-ONE" not in got.text


def test_html_boilerplate_by_id_and_class_words() -> None:
    html = (
        "<body><p>Keep me.</p>"
        "<div id='mainMenu'>CAMEL-MENU</div>"
        "<div class='site_footer'>SNAKE-FOOTER</div>"
        "<div class='cookie-banner'>COOKIE</div>"
        "<div class='navigation-links'>NAVLINKS</div>"
        "<div class='menuitem-description'>Keep menuitem words.</div>"
        "<div class='supernova'>Keep supernova.</div>"
        "<div hidden>HIDDEN-ATTR</div>"
        "</body>"
    )
    got = extract_text(html.encode(), "text/html", URL)
    assert got.text == "Keep me.\n\nKeep menuitem words.\n\nKeep supernova."


def test_html_section_ids_are_title_slugs_not_boilerplate() -> None:
    """Docs sites give each section the slug of its title as id (Sphinx on the section,
    MkDocs and Docusaurus on the heading): ``csrf-cookie-secure`` or ``select-related`` is
    a section of the page, not a cookie banner or a related-posts box."""
    html = (
        "<body><main><h1>Settings</h1><p>Intro.</p>"
        "<div class='section' id='csrf-cookie-secure'><h2>CSRF_COOKIE_SECURE</h2>"
        "<p>Whether to use a secure cookie for the CSRF cookie.</p></div>"
        "<h2 id='select-related'>select_related()</h2><p>Follows foreign keys.</p>"
        "<div id='cookie-banner'><h2>We use cookies</h2><p>BANNER</p></div>"
        "<div id='related'><h3>Related</h3><ul><li><a href='/a'>LINK-A</a></li>"
        "<li><a href='/b'>LINK-B</a></li></ul></div>"
        "</main></body>"
    )
    got = extract_text(html.encode(), "text/html", URL)
    assert "Whether to use a secure cookie for the CSRF cookie." in got.text
    assert "select_related()\n\nFollows foreign keys." in got.text
    assert "BANNER" not in got.text  # its id is not its heading's slug
    assert "LINK-A" not in got.text  # titled by its id, but a box of links


def test_html_whitespace_and_inline_elements() -> None:
    html = (
        "<body><p>  Many\n\n   spaces\tand&nbsp;tabs, <a href='#'>link</a>"
        "<b>bold</b>joined.</p><p>Line<br>break</p>"
        "<table><tr><th>Name</th><th>Value</th></tr><tr><td>a</td><td>1</td></tr></table>"
        "<!-- a comment --><h3>Heading</h3>tail text</body>"
    )
    got = extract_text(html.encode(), "text/html", URL)
    assert got.text == (
        "Many spaces and tabs, linkboldjoined.\n\nLine\nbreak\n\nName Value\na 1\n\n"
        "Heading\n\ntail text"
    )


def test_html_title_fallbacks() -> None:
    no_title = "<html><body><h1>  First\n heading </h1><h1>Second</h1><p>x</p></body></html>"
    assert extract_text(no_title.encode(), "text/html", URL).title == "First heading"
    nothing = "<html><body><p>No headings here.</p></body></html>"
    got = extract_text(nothing.encode(), "text/html", URL)
    assert got.title is None
    assert got.text == "No headings here."
    empty_title = "<html><head><title>   </title></head><body><h1>H</h1></body></html>"
    assert extract_text(empty_title.encode(), "text/html", URL).title == "H"


def test_html_empty_and_script_only_pages() -> None:
    assert extract_text(b"", "text/html", URL) == Extracted(text="", title=None, kind="html")
    got = extract_text(b"<html><body><script>x()</script></body></html>", "text/html", URL)
    assert got.text == ""


def test_html_deeply_nested_does_not_recurse() -> None:
    depth = 5000
    html = "<body>" + "<div>" * depth + "<p>deep text</p>" + "</div>" * depth + "</body>"
    got = extract_text(html.encode(), "text/html", URL, max_depth=depth + 10)
    assert got.text == "deep text"


def test_html_nested_deeper_than_the_limit_is_refused() -> None:
    html = "<body>" + "<div>" * 600 + "<p>deep text</p>" + "</div>" * 600 + "</body>"
    with pytest.raises(PageTooDeep) as info:
        extract_text(html.encode(), "text/html", URL)  # MAX_DEPTH = 512
    assert info.value.error_class == "too_deep"
    shallow = "<body>" + "<div>" * 400 + "<p>deep text</p>" + "</div>" * 400 + "</body>"
    assert extract_text(shallow.encode(), "text/html", URL).text == "deep text"


def test_xhtml_content_type() -> None:
    body = b'<html xmlns="http://www.w3.org/1999/xhtml"><body><p>XHTML body</p></body></html>'
    got = extract_text(body, "application/xhtml+xml", URL)
    assert (got.kind, got.text) == ("html", "XHTML body")


# --- charsets -------------------------------------------------------------------------


def test_charset_from_content_type() -> None:
    body = "<p>Caf\u00e9 cr\u00e8me</p>".encode("iso-8859-1")
    got = extract_text(body, 'text/html; charset="ISO-8859-1"', URL)
    assert got.text == "Caf\u00e9 cr\u00e8me"


def test_latin1_label_means_windows_1252() -> None:
    # 0x93/0x94 are curly quotes in windows-1252, invisible C1 controls in ISO-8859-1.
    body = b"<p>\x93quoted\x94 \x80</p>"
    got = extract_text(body, "text/html; charset=iso-8859-1", URL)
    assert got.text == "\u201cquoted\u201d \u20ac"


def test_charset_from_html_meta() -> None:
    body = '<html><head><meta charset="windows-1251"></head><body><p>Привет</p></body></html>'
    got = extract_text(body.encode("cp1251"), "text/html", URL)
    assert got.text == "Привет"
    http_equiv = (
        '<html><head><meta http-equiv="Content-Type" content="text/html; charset=Shift_JIS">'
        "</head><body><p>日本語</p></body></html>"
    )
    assert extract_text(http_equiv.encode("shift_jis"), "text/html", URL).text == "日本語"


def test_header_charset_beats_meta() -> None:
    body = '<meta charset="windows-1251"><p>Caf\u00e9</p>'.encode()
    assert extract_text(body, "text/html; charset=utf-8", URL).text == "Caf\u00e9"


def test_bom_beats_everything() -> None:
    body = "\ufeff<p>BOM \u00fcber</p>".encode("utf-16-le")
    # utf-16-le's BOM is FF FE; the header lies
    assert body.startswith(b"\xff\xfe")
    assert extract_text(body, "text/html; charset=iso-8859-1", URL).text == "BOM \u00fcber"
    utf8 = "\ufeffplain \u00fcber".encode()
    assert extract_text(utf8, "text/plain", URL).text == "plain \u00fcber"


def test_unknown_charset_falls_back_to_utf8_and_bad_bytes_are_replaced() -> None:
    body = "<p>na\u00efve</p>".encode()
    assert extract_text(body, "text/html; charset=x-no-such", URL).text == "na\u00efve"
    broken = b"<p>ok \xff\xfe end</p>"
    assert extract_text(broken, "text/html", URL).text == "ok \ufffd\ufffd end"
    assert extract_text(b"bad \xc3 byte", "text/plain", URL).text == "bad \ufffd byte"


def test_text_charset_from_content_type() -> None:
    body = "r\u00e9sum\u00e9".encode("latin-1")
    assert extract_text(body, "text/plain; charset=latin-1", URL).text == "r\u00e9sum\u00e9"


# --- sniffing when the type is missing ------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"<!DOCTYPE html><html><body><p>Sniffed</p></body></html>",
        b"  \n<html><body><p>Sniffed</p></body></html>",
        b"<!-- generated --><!doctype HTML><body><p>Sniffed</p></body>",
        b"\xef\xbb\xbf<!DOCTYPE html><p>Sniffed</p>",
    ],
)
def test_sniff_html_without_content_type(body: bytes) -> None:
    got = extract_text(body, None, "https://example.com/x")
    assert (got.kind, got.text) == ("html", "Sniffed")


def test_missing_type_uses_suffix_or_treats_text_as_plain() -> None:
    assert extract_text(b"# Title\n\nbody", None, "https://x.org/README.md").title == "Title"
    rst = extract_text(b"Intro\n=====\n\nbody", "", "https://x.org/a.rst")
    assert (rst.kind, rst.title) == ("text", "Intro")
    plain = extract_text(b"first line\nsecond", None, "https://x.org/notes")
    assert (plain.kind, plain.title, plain.text) == ("text", "first line", "first line\nsecond")
    html = extract_text(b"<p>no doctype</p>", None, "https://x.org/page.html")
    assert (html.kind, html.text) == ("html", "no doctype")


# --- text, Markdown, reStructuredText -------------------------------------------------


def test_text_normalisation() -> None:
    body = b"\r\n\r\nline one   \r\nline two\t\rline three\n\n\n\n\n\n  indented\n\n\n\nend  \n\n"
    got = extract_text(body, "text/plain", URL)
    assert got.kind == "text"
    assert got.text == "line one\nline two\nline three\n\n\n  indented\n\n\nend"
    assert got.title == "line one"


def test_a_first_line_longer_than_a_title_is_not_one() -> None:
    """A text page's title is a guess, its first line; a line over MAX_TITLE_CHARS is a
    paragraph (or one hostile token), and as a title it would label every chunk."""
    assert extract_text(b"x" * (MAX_TITLE_CHARS + 1), "text/plain", URL).title is None
    long_first = b"word " * 200 + b"\nsecond line"
    assert extract_text(long_first, "text/markdown", URL).title is None
    assert extract_text(b"Short title\nbody", "text/plain", URL).title == "Short title"


def test_two_blank_lines_are_kept() -> None:
    got = extract_text(b"a\n\n\nb", "text/plain", URL)
    assert got.text == "a\n\n\nb"


def test_markdown_title_is_first_atx_heading() -> None:
    body = b"Some intro line\n\n```\n# not a heading (code)\n```\n\n## Sub\n\n# The Title #\n\ntext"
    got = extract_text(body, "text/markdown; charset=utf-8", URL)
    assert got.title == "The Title"
    assert got.text == body.decode()


def test_markdown_setext_and_fallback_titles() -> None:
    assert extract_text(b"My Title\n========\n\nbody", "text/markdown", URL).title == "My Title"
    assert extract_text(b"\n\n  just text\nmore", "text/x-markdown", URL).title == "just text"
    # text/plain served for a .md file: Markdown rules
    got = extract_text(b"intro\n\n# Real\n", "text/plain", "https://x.org/doc.md")
    assert got.title == "Real"


RST_DOC = """.. _topics-http-views:

=============
Writing views
=============

A view function, or *view* for short, is a Python function that takes a web
request and returns a web response.

A simple view
=============

Here's a view.
"""


def test_rst_title_is_the_underlined_line() -> None:
    got = extract_text(RST_DOC.encode(), "text/x-rst", "https://x.org/views")
    assert got.title == "Writing views"
    assert got.kind == "text"
    assert got.text == RST_DOC.rstrip("\n")


def test_txt_rst_and_plain_titles() -> None:
    # Django's docs are .txt files served as text/plain: reStructuredText rules apply
    got = extract_text(RST_DOC.encode(), "text/plain", "https://x.org/docs/views.txt")
    assert got.title == "Writing views"
    no_section = b".. note:: directive first\n\nFirst real line.\n"
    assert extract_text(no_section, "text/x-rst", URL).title == "First real line."
    underline_only = b"Title here\n----------\n\ntext"
    got = extract_text(underline_only, "text/plain", "https://x.org/a.txt")
    assert got.title == "Title here"
    assert extract_text(b"   \n\n", "text/plain", URL) == Extracted("", None, "text")


# --- unsupported ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "image/png",
        "application/octet-stream",
        "application/zip",
        "video/mp4",
        "application/json",
        "text/css",
    ],
)
def test_unsupported_types_raise_with_the_type(content_type: str) -> None:
    with pytest.raises(UnsupportedContent, match=re.escape(content_type)):
        extract_text(b"\x89PNG\r\n\x1a\n\x00\x00", f"{content_type}; charset=binary", URL)


def test_unsupported_is_a_value_error_and_binary_without_type_is_refused() -> None:
    assert issubclass(UnsupportedContent, ValueError)
    with pytest.raises(UnsupportedContent, match="none given"):
        extract_text(b"\x89PNG\r\n\x00\x01\x02binary", None, "https://x.org/file")


@pytest.mark.parametrize("content_type", ["application/pdf", "application/octet-stream", None])
def test_bytes_that_claim_to_be_a_pdf_and_are_not_are_unsupported(
    content_type: str | None,
) -> None:
    """A PDF is read (tests/test_pdf.py); one pypdf cannot read is refused as such, whether
    the server said so or its ``%PDF-`` magic did."""
    with pytest.raises(UnsupportedContent, match="unreadable PDF"):
        extract_text(b"%PDF-1.7\n\x00\x01\x02binary", content_type, "https://x.org/file")


def test_extracted_is_frozen() -> None:
    got = extract_text(b"x", "text/plain", URL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.text = "y"  # type: ignore[misc]


# --- bounds (issue 8: a hostile page is refused or tamed, in bounded time) -----------


@pytest.mark.parametrize(
    "label", ["punycode", "idna", "utf-7", "rot13", "raw_unicode_escape", "unicode_escape", "hex"]
)
def test_unsafe_charsets_read_as_utf8(label: str) -> None:
    # punycode decoding is quadratic; utf-7 yields lone surrogates; none is a web charset.
    body = "<p>caf\u00e9 +AGEAYgBj- " + "a-" * 20_000 + "</p>"
    got = extract_text(body.encode(), f"text/html; charset={label}", URL)
    assert got.text.startswith("caf\u00e9 +AGEAYgBj- a-a-")
    meta = f'<meta charset="{label}"><p>caf\u00e9</p>'.encode()
    assert extract_text(meta, "text/html", URL).text == "caf\u00e9"
    assert extract_text(b"caf\xc3\xa9", f"text/plain; charset={label}", URL).text == "caf\u00e9"


def test_control_characters_are_dropped() -> None:
    body = b"a\x00b\x01c\x1b[31md\x7fe\xc2\x85f\tg\x0bh\x0ci"
    assert extract_text(body, "text/plain", URL).text == "abc[31mdef\tg\nh\ni"
    html = b"<title>T\x00itle\x1f</title><p>x\x00y\x08z</p><pre>p\x01re</pre>"
    got = extract_text(html, "text/html", URL)
    assert (got.text, got.title) == ("xyz\n\npre", "T\ufffditle")  # the parser: NUL is U+FFFD


def test_whitespace_runs_are_collapsed() -> None:
    body = ("word" + " " * 1_500_000 + "next\n" + "\u3000" * 5000 + "\n\n\n\n\n\nend").encode()
    got = extract_text(body, "text/plain", URL)
    assert got.text == "word next\n\n\nend"
    assert extract_text(b" \n\t" * 500_000, "text/plain", URL).text == ""
    pre = "<pre>a" + " " * 200_000 + "b" + "\n" * 50_000 + "c</pre>"
    assert extract_text(pre.encode(), "text/html", URL).text == "a b\n\n\nc"
    indent = "x\n" + " " * 40 + "indented"
    assert extract_text(indent.encode(), "text/plain", URL).text == indent  # kept


def test_text_over_the_limit_is_refused() -> None:
    with pytest.raises(PageTooLarge) as info:
        extract_text(b"word " * 1000, "text/plain", URL, max_chars=4000)
    assert info.value.error_class == "too_large"
    assert extract_text(b"word " * 1000, "text/plain", URL, max_chars=5000).text
    assert MAX_TEXT_CHARS >= 1_000_000


def test_title_is_capped() -> None:
    body = ("<title>" + "t" * 100_000 + "</title><p>x</p>").encode()
    assert len(extract_text(body, "text/html", URL).title or "") == 512
    text = ("# " + "h" * 100_000 + "\n\nbody").encode()
    assert len(extract_text(text, "text/markdown", URL).title or "") == 512


def test_default_bounds_match_the_settings() -> None:
    from streams.documents import MAX_CHUNKS_PER_PAGE, PageLimits
    from streams.extract import MAX_DEPTH
    from streams.settings import Settings

    s = Settings()
    assert (s.extract_max_chars, s.extract_max_depth, s.chunk_max_per_page) == (
        MAX_TEXT_CHARS,
        MAX_DEPTH,
        MAX_CHUNKS_PER_PAGE,
    )
    assert PageLimits.from_settings(s) == PageLimits()
