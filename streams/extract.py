"""From a fetched body to the text worth embedding: decode, pick the main content, keep blocks.

Pure (no I/O), so the expected index can be computed without a fetcher. Navigation, footers
and scripts are dropped because they repeat on every page of a site: embedded, they would
make every page look alike and drown the real content in search results.

Blocks (paragraphs, headings, list items, code) come out separated by newlines: a blank line
between paragraphs, headings and code blocks, one newline between list items, table rows and
``<br>`` lines. The chunker prefers to cut at blank lines, so this is what keeps a chunk from
starting in the middle of a paragraph.

Bounded, because pages are untrusted (docs/security.md): only charsets from a safe list are
used to decode (others read as UTF-8 with replacement: ``punycode``, ``idna``, ``utf-7``,
``rot13`` and friends are not how web pages are written, and some decode in quadratic time);
control characters other than ``\n`` and ``\t`` are dropped (JSON escapes each as six bytes,
and they are never text); whitespace runs longer than ``MAX_SPACE_RUN`` become one space; an
HTML tree deeper than ``max_depth`` elements is refused before anything walks it; text over
``max_chars`` is refused. Each refusal is a ``PageRefused`` whose ``error_class`` names the
dead-letter class. What bounds the HTML parser itself (its tree building costs depth x tags)
is the deadline of the process that runs extraction (``agents/extractor.py``).
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from urllib.parse import urlsplit

from selectolax.lexbor import LexborHTMLParser, LexborNode

from streams.errors import (
    ExtractTimeout,
    PageRefused,
    PageTooDeep,
    PageTooLarge,
    TooManyChunks,
    UnsupportedContent,
)
from streams.pdf import looks_like_pdf, pdf_pages
from streams.structure import MAX_HEADING_CHARS, Section, md_inline, rst_inline, sections_of

__all__ = [
    "MAX_DEPTH",
    "MAX_TEXT_CHARS",
    "FILE_TYPES",
    "ExtractTimeout",
    "Extracted",
    "PageRefused",
    "PageTooDeep",
    "PageTooLarge",
    "TooManyChunks",
    "UnsupportedContent",
    "extract_text",
]

#: Defaults of ``Settings.extract_max_chars`` / ``extract_max_depth`` (kept equal by a test).
MAX_TEXT_CHARS = 4_000_000
MAX_DEPTH = 512
#: Longest run of whitespace (newlines aside) kept as is; longer runs become one space.
MAX_SPACE_RUN = 100
#: Most characters of a title (Milvus stores at most 512 bytes of it; the writer cuts bytes).
MAX_TITLE_CHARS = 512


@dataclass(frozen=True, slots=True)
class Extracted:
    """The text of one page, its title (if any) and how it was read (``html`` or ``text``);
    with ``structured=True``, also its sections (``streams.structure``): headings as a path,
    not as text. ``flavor`` says which parser read it (``html``, ``md``, ``rst``, ``plain``)."""

    text: str
    title: str | None
    kind: str
    sections: tuple[Section, ...] = field(default=(), compare=False)
    flavor: str = field(default="", compare=False)


HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
MARKDOWN_TYPES = frozenset({"text/markdown", "text/x-markdown"})
RST_TYPES = frozenset({"text/x-rst", "text/prs.fallenstein.rst", "text/restructuredtext"})
PLAIN_TYPES = frozenset({"text/plain"})
PDF_TYPES = frozenset({"application/pdf", "application/x-pdf"})
#: Types that say nothing about the bytes: a PDF among them is known by its magic number.
_OPAQUE_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})
TEXT_TYPES = MARKDOWN_TYPES | RST_TYPES | PLAIN_TYPES

_MD_SUFFIXES = frozenset({".md", ".markdown"})
_RST_SUFFIXES = frozenset({".rst", ".txt"})
_HTML_SUFFIXES = frozenset({".html", ".htm", ".xhtml"})
_PDF_SUFFIX = ".pdf"
#: Content types of local files (``file://``) by suffix: a disk says nothing of types. These
#: suffixes are also what ``ragstream publish DIR`` picks up (``ops/localfiles.py``).
FILE_TYPES = {
    **dict.fromkeys(_MD_SUFFIXES, "text/markdown"),
    ".rst": "text/x-rst",
    ".txt": "text/plain",
    ".text": "text/plain",
    **dict.fromkeys((".html", ".htm"), "text/html"),
    ".xhtml": "application/xhtml+xml",
    _PDF_SUFFIX: "application/pdf",
}

# --- decoding -----------------------------------------------------------------------------

_BOMS = (
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
#: What browsers do (WHATWG Encoding): these labels mean windows-1252, whose 0x80-0x9F are
#: curly quotes and dashes rather than invisible C1 controls.
_WINDOWS_1252_ALIASES = frozenset({"latin_1", "ascii", "iso8859-1"})
#: Python codec names of the WHATWG Encoding standard's encodings (what browsers decode pages
#: with), plus ``utf-8-sig``. Any other label reads as UTF-8: Python also knows text
#: transforms (``punycode``, ``idna``, ``rot13``, ``utf-7``, ``raw_unicode_escape``...) that
#: no page is written in, some quadratic in time, some yielding lone surrogates.
_SAFE_CODECS = frozenset(
    {
        "utf-8",
        "utf-8-sig",
        "utf-16",
        "utf-16-le",
        "utf-16-be",
        "cp1252",
        "cp866",
        "cp874",
        "cp1250",
        "cp1251",
        "cp1253",
        "cp1254",
        "cp1255",
        "cp1256",
        "cp1257",
        "cp1258",
        *(f"iso8859-{n}" for n in (2, 3, 4, 5, 6, 7, 8, 10, 13, 14, 15, 16)),
        "koi8-r",
        "koi8-u",
        "mac-roman",
        "mac-cyrillic",
        "gbk",
        "gb2312",
        "gb18030",
        "big5",
        "big5hkscs",
        "euc_jp",
        "iso2022_jp",
        "shift_jis",
        "cp932",
        "euc_kr",
        "cp949",
    }
)
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9._:\-]+)""", re.I)
_SNIFF_HTML = re.compile(
    rb"^(?:\xef\xbb\xbf)?\s*(?:<!--.*?-->\s*)*<(?:!doctype\s+html|html)[\s>]", re.I | re.S
)


def _parse_content_type(content_type: str | None) -> tuple[str, dict[str, str]]:
    if not content_type:
        return "", {}
    mime, *params = content_type.split(";")
    out: dict[str, str] = {}
    for p in params:
        k, sep, v = p.partition("=")
        if sep:
            out[k.strip().lower()] = v.strip().strip("\"'")
    return mime.strip().lower(), out


def _codec(label: str | None) -> str | None:
    """Python's codec name for a charset label, or None for an unknown or unsafe one."""
    if not label or len(label) > 64:
        return None
    try:
        name = codecs.lookup(label.strip()).name
    except LookupError:
        return None
    if name in _WINDOWS_1252_ALIASES:
        return "cp1252"
    return name if name in _SAFE_CODECS else None


def _decode(body: bytes, charset: str | None, is_html: bool) -> str:
    """A byte order mark wins, then the declared charset, then a ``<meta>`` one, then UTF-8.

    Never raises: undecodable bytes become U+FFFD, because a page with one bad byte is still
    worth indexing.
    """
    for bom, name in _BOMS:
        if body.startswith(bom):
            return body[len(bom) :].decode(name, errors="replace")
    codec = _codec(charset)
    if codec is None and is_html:
        m = _META_CHARSET.search(body[:4096])
        if m:
            codec = _codec(m.group(1).decode("ascii", "replace"))
            if codec in ("utf-16", "utf-16-le", "utf-16-be"):
                codec = "utf-8"  # a <meta> readable as ASCII cannot be UTF-16 (WHATWG says so)
    return body.decode(codec or "utf-8", errors="replace")


# --- plain text, Markdown, reStructuredText -----------------------------------------------

_RST_ADORNMENT = re.compile(r"""^([=\-`:'"~^_*+#<>.!$%&(),/;?@\[\\\]{|}])\1{2,}\s*$""")
_MD_ATX = re.compile(r"^\s{0,3}#\s+(.+?)\s*#*\s*$")
_MD_SETEXT = re.compile(r"^\s{0,3}(=+|-+)\s*$")


#: Dropped: C0 controls but ``\t``/``\n``, DEL, C1 controls, and lone surrogates (orjson
#: cannot encode them, and a message that cannot be encoded would stop the stage).
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f\ud800-\udfff]+")
_NEWLINES = str.maketrans({"\r": "\n", "\x0b": "\n", "\x0c": "\n"})
_SPACE_RUN = re.compile(rf"[^\S\n]{{{MAX_SPACE_RUN + 1},}}")
_BLANK_LINES = re.compile(r"\n{4,}")


def sanitize(text: str) -> str:
    """Text fit for a JSON message and a chunker: no control characters, no huge space runs.

    ``\\r``, vertical tab and form feed become newlines (they separate lines or pages);
    other controls go. Linear in the text (regular expressions without backtracking).
    """
    text = text.replace("\r\n", "\n").translate(_NEWLINES)
    text = _CONTROL.sub("", text)
    return _SPACE_RUN.sub(" ", text)


def normalize_text(text: str) -> str:
    """``\\n`` newlines, no trailing spaces, at most two blank lines in a row, no blank ends.

    Keeps leading indentation: in reStructuredText and Markdown it carries meaning (code and
    literal blocks).
    """
    text = sanitize(text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = _BLANK_LINES.sub("\n\n\n", text)
    return text.strip("\n")


def _first_line(lines: list[str], skip_directives: bool) -> str | None:
    """A text page's title when it names none: its first line, unless that line is longer
    than a title (a paragraph, or one hostile token), which would label every chunk."""
    for line in lines:
        s = line.strip()
        if not s or _RST_ADORNMENT.match(s):
            continue
        if skip_directives and s.startswith(".."):
            continue
        return s if len(s) <= MAX_TITLE_CHARS else None
    return None


def _rst_title(lines: list[str]) -> str | None:
    """The first section title: a text line directly above an adornment line."""
    for above, below in zip(lines, lines[1:], strict=False):
        a = above.strip()
        if a and not _RST_ADORNMENT.match(a) and _RST_ADORNMENT.match(below.strip()):
            return a
    return None


def _markdown_title(lines: list[str]) -> str | None:
    """The first ``# `` heading; else a setext ``Title`` over ``=====``."""
    in_fence = False
    for line in lines:
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
            continue
        if not in_fence:
            m = _MD_ATX.match(line)
            if m:
                return m.group(1).strip()
    for above, below in zip(lines, lines[1:], strict=False):
        if above.strip() and _MD_SETEXT.match(below) and below.strip()[0] == "=":
            return above.strip()
    return None


def _text_title(text: str, flavor: str) -> str | None:
    lines = text.split("\n")
    if flavor == "md":
        heading = _markdown_title(lines)
        return md_inline(heading) if heading else _first_line(lines, skip_directives=False)
    if flavor == "rst":
        title = _rst_title(lines)
        return rst_inline(title) if title else _first_line(lines, skip_directives=True)
    return _first_line(lines, skip_directives=False)


# --- HTML ---------------------------------------------------------------------------------

#: Removed with their content wherever they are: never the text of the page.
_DROP_TAGS = (
    "script",
    "style",
    "noscript",
    "template",
    "nav",
    "footer",
    "aside",
    "form",
    "button",
    "select",
    "svg",
    "canvas",
    "iframe",
    "object",
    "embed",
    "dialog",
)
_DROP_SELECTOR = ", ".join(
    (
        *_DROP_TAGS,
        "[hidden]",
        '[aria-hidden="true"]',
        '[role="navigation"]',
        '[role="banner"]',
        '[role="contentinfo"]',
        '[role="complementary"]',
        '[role="search"]',
        '[role="dialog"]',
    )
)
#: An id or class containing one of these words (split on ``-``/``_``, or camelCase) marks
#: boilerplate: ``site-footer``, ``sidebarLeft``, ``cookie_banner``, ``breadcrumbs``...
_BOILERPLATE_WORDS = frozenset(
    {
        "nav",
        "navbar",
        "navigation",
        "menu",
        "menubar",
        "sidebar",
        "breadcrumb",
        "breadcrumbs",
        "cookie",
        "cookies",
        "consent",
        "footer",
        "masthead",
        "banner",
        "advert",
        "advertisement",
        "ads",
        "share",
        "social",
        "skiplink",
        "toc",
        "related",
        "pagination",
        "newsletter",
        "popup",
        "modal",
    }
)
#: Ancestors that make a ``<header>`` the heading of the content, not the site banner.
_SECTIONING = frozenset({"article", "main", "section"})
_PARAGRAPH_BLOCKS = frozenset(
    {
        "address",
        "article",
        "blockquote",
        "body",
        "center",
        "details",
        "div",
        "dl",
        "fieldset",
        "figure",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "header",
        "hgroup",
        "hr",
        "main",
        "ol",
        "p",
        "pre",
        "section",
        "table",
        "ul",
    }
)
_LINE_BLOCKS = frozenset(
    {"br", "caption", "dd", "dt", "figcaption", "li", "option", "summary", "tbody", "tr"}
)
_CELLS = frozenset({"td", "th"})
_PERMALINK_MARKS = frozenset({"¶", "#", "§", "🔗"})
_SPACE = re.compile(r"\s+")
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")


def _words(value: str) -> set[str]:
    out: set[str] = set()
    for token in value.split():
        for part in re.split(r"[-_:.]+", _CAMEL.sub("-", token)):
            if part:
                out.add(part.lower())
    return out


def _is_boilerplate_name(node: LexborNode) -> bool:
    """Whether the element's class or id names boilerplate (``cookie-banner``, ``nav``).

    An id that is the slug of the element's own heading is a title, not a name: docs sites
    give every section one (Sphinx on the section, MkDocs and Docusaurus on the heading),
    and ``csrf-cookie-secure`` or ``select-related`` must not take its section with it.
    """
    attrs = node.attributes
    words = _words(attrs.get("class") or "")
    ident = attrs.get("id") or ""
    if ident:
        named = _words(ident) & _BOILERPLATE_WORDS
        if named and not _titled_by(node, ident):
            words |= named
    return bool(words & _BOILERPLATE_WORDS)


_ALNUM = re.compile(r"[a-z0-9]+")


def _titled_by(node: LexborNode, ident: str) -> bool:
    """Whether ``ident`` is a slug of the element's heading (the element itself, or the
    first heading inside it), and the element is prose rather than a box of links (a
    "Related" list titled by its own id is still boilerplate)."""
    heading = node if node.tag in _HEADINGS else node.css_first("h1, h2, h3, h4, h5, h6")
    if heading is None:
        return False
    slug = set(_ALNUM.findall(ident.lower()))
    if not slug or not slug <= set(_ALNUM.findall(heading.text(deep=True).lower())):
        return False
    return heading is node or _link_density(node, _text_len(node)) < 0.5


def _has_ancestor(node: LexborNode, tags: frozenset[str], root: LexborNode) -> bool:
    """Whether an ancestor of ``node``, up to and including ``root``, has one of ``tags``."""
    parent = node.parent
    while parent is not None:
        if parent.tag in tags:
            return True
        if parent.mem_id == root.mem_id:
            return False
        parent = parent.parent
    return False


def _text_len(node: LexborNode) -> int:
    return len(_SPACE.sub("", node.text(deep=True)))


def _link_density(node: LexborNode, total: int) -> float:
    if total == 0:
        return 1.0
    return sum(_text_len(a) for a in node.css("a")) / total


def _choose_root(tree: LexborHTMLParser) -> LexborNode | None:
    """``<main>``, else ``[role=main]``, else the only ``<article>``, else ``<body>``."""
    for selector in ("main", '[role="main"]'):
        node = tree.css_first(selector)
        if node is not None and _text_len(node) > 0:
            return node
    articles = tree.css("article")
    if len(articles) == 1 and _text_len(articles[0]) > 0:
        return articles[0]
    return tree.body or tree.root


def _decompose_outermost(nodes: list[LexborNode]) -> None:
    """Remove ``nodes`` from the tree, each subtree once.

    Decomposing a node frees its descendants; touching one of them afterwards (a ``<nav>``
    inside a removed ``<footer>``) would use freed memory, so nested matches are skipped.
    """
    ids = {n.mem_id for n in nodes}
    outermost = []
    for node in nodes:
        parent = node.parent
        while parent is not None and parent.mem_id not in ids:
            parent = parent.parent
        if parent is None:
            outermost.append(node)
    for node in outermost:
        node.decompose()


def _strip_boilerplate(root: LexborNode) -> None:
    """Remove boilerplate under ``root`` (never ``root`` itself).

    By tag and ARIA role unconditionally, except a ``<header>`` inside an article/section
    (that is the article's own heading). By id/class word only when the element is not
    most of the remaining text in running prose: a wrapper such as
    ``<div class="content has-sidebar">`` holding the article must survive, while a big
    menu (mostly link text) still goes. Permalink markers (``<a>¶</a>`` after Sphinx
    headings) go too: they would end every heading line with a stray symbol.
    """
    doomed = list(root.css(_DROP_SELECTOR))
    doomed += [h for h in root.css("header") if not _has_ancestor(h, _SECTIONING, root)]
    doomed += [a for a in root.css("a") if a.text(deep=True).strip() in _PERMALINK_MARKS]
    _decompose_outermost(doomed)
    total = _text_len(root)
    named = []
    for node in root.css("[id], [class]"):
        if not _is_boilerplate_name(node):
            continue
        own = _text_len(node)
        if total and own > total * 0.5 and _link_density(node, own) < 0.5:
            continue
        named.append(node)
    _decompose_outermost(named)


class _Writer:
    """Accumulates inline text; blocks ask for line or paragraph breaks between texts."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.pending_breaks = 0
        self.pending_space = False
        self.started = False

    def brk(self, newlines: int) -> None:
        if self.started:
            self.pending_breaks = max(self.pending_breaks, newlines)

    def _sep(self) -> None:
        if self.pending_breaks:
            self.parts.append("\n" * self.pending_breaks)
        elif self.pending_space and self.started:
            self.parts.append(" ")
        self.pending_breaks = 0
        self.pending_space = False
        self.started = True

    def inline(self, raw: str) -> None:
        text = _SPACE.sub(" ", raw)
        core = text.strip(" ")
        if not core:
            if text:
                self.pending_space = True
            return
        if text.startswith(" "):
            self.pending_space = True
        self._sep()
        self.parts.append(core)
        self.pending_space = text.endswith(" ")

    def preformatted(self, raw: str) -> None:
        lines = [line.rstrip() for line in raw.replace("\r\n", "\n").split("\n")]
        text = "\n".join(lines).strip("\n")
        if text:
            self._sep()
            self.parts.append(text)

    def text(self) -> str:
        return "".join(self.parts).strip()


_HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}


class _SectionWriter:
    """The same text as :class:`_Writer`, cut at ``h1``-``h6``: each section's body in a
    writer of its own, each heading's text into the path instead of the body."""

    def __init__(self) -> None:
        self.sections: list[Section] = []
        self.path: tuple[str, ...] = ()
        self.levels: tuple[int, ...] = ()
        self.body = _Writer()
        self.head: _Writer | None = None
        self.level = 0

    @property
    def current(self) -> _Writer:
        return self.head if self.head is not None else self.body

    def _flush(self) -> None:
        body = _BLANK_LINES.sub("\n\n", sanitize(self.body.text())).strip()
        if body:
            self.sections.append(Section(self.path, body))
        self.body = _Writer()

    def open_heading(self, level: int) -> None:
        self._flush()
        self.head, self.level = _Writer(), level

    def close_heading(self) -> None:
        if self.head is None:
            return
        text = _clean_title(self.head.text()) or ""
        keep = 0
        while keep < len(self.levels) and self.levels[keep] < self.level:
            keep += 1
        if text:
            self.path = (*self.path[:keep], text[:MAX_HEADING_CHARS].rstrip())
            self.levels = (*self.levels[:keep], self.level)
        else:
            self.path, self.levels = self.path[:keep], self.levels[:keep]
        self.head = None

    def done(self) -> tuple[Section, ...]:
        self.close_heading()
        self._flush()
        if not self.sections and self.path:  # headings only: they are the page's text
            return (Section((), "\n".join(self.path)),)
        return tuple(self.sections)


def _render(root: LexborNode, sections: _SectionWriter | None = None) -> str:
    """The visible text of ``root`` with its block structure (iterative: deep DOMs are fine);
    with ``sections``, the same text cut into sections there too."""
    out = _Writer()
    pre_depth = 0
    head_depth = 0
    stack: list[tuple[LexborNode, bool]] = [(root, True)]
    while stack:
        node, entering = stack.pop()
        tag = node.tag
        sec = sections.current if sections is not None else None
        if not entering:
            if tag == "pre":
                pre_depth -= 1
            if tag in _PARAGRAPH_BLOCKS:
                out.brk(2)
                if sec is not None:
                    sec.brk(2)
            elif tag in _LINE_BLOCKS:
                out.brk(1)
                if sec is not None:
                    sec.brk(1)
            if sections is not None and tag in _HEADINGS:
                head_depth -= 1
                if head_depth == 0:
                    sections.close_heading()
            continue
        if tag == "-text":
            raw = node.text(deep=False)
            if pre_depth:
                out.preformatted(raw)
                if sec is not None:
                    sec.preformatted(raw)
            else:
                out.inline(raw)
                if sec is not None:
                    sec.inline(raw)
            continue
        if tag is None or tag.startswith("-"):  # comments, doctype
            continue
        if sections is not None and tag in _HEADINGS:
            if head_depth == 0:  # a heading inside a heading is part of its text
                sections.open_heading(_HEADINGS[tag])
                sec = sections.current
            head_depth += 1
        if tag in _PARAGRAPH_BLOCKS:
            out.brk(2)
            if sec is not None:
                sec.brk(2)
        elif tag in _LINE_BLOCKS:
            out.brk(1)
            if sec is not None:
                sec.brk(1)
        elif tag in _CELLS:
            out.inline(" ")
            if sec is not None:
                sec.inline(" ")
        if tag == "pre":
            pre_depth += 1
        stack.append((node, False))
        children = list(node.iter(include_text=True))
        stack.extend((child, True) for child in reversed(children))
    return out.text()


def _clean_title(raw: str | None) -> str | None:
    if raw is None:
        return None
    title = _SPACE.sub(" ", _CONTROL.sub("", raw[: MAX_TITLE_CHARS * 8])).strip()
    return title[:MAX_TITLE_CHARS].rstrip() or None


def _deeper_than(root: LexborNode, limit: int) -> bool:
    """Whether any element lies more than ``limit`` levels below ``root``.

    Runs before anything that walks ancestors (boilerplate stripping), so those walks cost at
    most ``limit`` steps each. Iterative, one visit per element, stops at the first too deep.
    """
    stack: list[tuple[LexborNode, int]] = [(root, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in node.iter(include_text=False))
    return False


def _extract_html(html: str, max_depth: int = MAX_DEPTH, structured: bool = False) -> Extracted:
    tree = LexborHTMLParser(html)
    if tree.root is not None and _deeper_than(tree.root, max_depth):
        raise PageTooDeep(f"HTML nests elements more than {max_depth} levels deep")
    title_node = tree.css_first("head > title") or tree.css_first("title")
    title = _clean_title(title_node.text(deep=True)) if title_node is not None else None
    first_h1 = tree.css_first("h1")
    doc_h1 = _clean_title(first_h1.text(deep=True)) if first_h1 is not None else None
    root = _choose_root(tree)
    if root is None:
        return Extracted(text="", title=title or doc_h1, kind="html", flavor="html")
    _strip_boilerplate(root)
    if title is None:
        h1 = root.css_first("h1")  # the content's own heading beats a logo <h1> in a banner
        title = (_clean_title(h1.text(deep=True)) if h1 is not None else None) or doc_h1
    sections = _SectionWriter() if structured else None
    text = _BLANK_LINES.sub("\n\n\n", sanitize(_render(root, sections))).strip()
    found = sections.done() if sections is not None else ()
    return Extracted(text=text, title=title, kind="html", sections=found, flavor="html")


# --- dispatch -----------------------------------------------------------------------------


def _suffix(url: str) -> str:
    try:
        return PurePosixPath(urlsplit(url).path).suffix.lower()
    except ValueError:
        return ""


def _looks_like_text(body: bytes) -> bool:
    head = body[:8192]
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(head) - 3  # a multi-byte character cut at the edge
    return True


def _classify(mime: str, body: bytes, url: str) -> tuple[str, str]:
    """``(kind, flavor)``: kind is ``html``/``text``/``pdf``; flavor is ``html``/``md``/``rst``/
    ``plain``/``pdf``.

    The declared type decides; the URL suffix only refines a text type (``text/plain`` for a
    ``.md`` file is common) or stands in when the server sent no type at all. A PDF sent as
    ``application/octet-stream`` (or untyped) is known by its ``%PDF-`` magic or ``.pdf``.
    """
    suffix = _suffix(url)
    if mime in PDF_TYPES or (
        mime in _OPAQUE_TYPES and (looks_like_pdf(body) or suffix == _PDF_SUFFIX)
    ):
        return "pdf", "pdf"
    if mime in HTML_TYPES:
        return "html", "html"
    if mime in MARKDOWN_TYPES:
        return "text", "md"
    if mime in RST_TYPES:
        return "text", "rst"
    if mime in PLAIN_TYPES:
        if suffix in _MD_SUFFIXES:
            return "text", "md"
        return "text", "rst" if suffix in _RST_SUFFIXES else "plain"
    if mime:
        raise UnsupportedContent(f"unsupported content type {mime!r} for {url}")
    if _SNIFF_HTML.match(body[:1024]) or suffix in _HTML_SUFFIXES:
        return "html", "html"
    if suffix in _MD_SUFFIXES:
        return "text", "md"
    if suffix in _RST_SUFFIXES:
        return "text", "rst"
    if _looks_like_text(body):
        return "text", "plain"
    raise UnsupportedContent(f"unsupported content type (none given, binary body) for {url}")


def _extract_pdf(body: bytes, url: str, max_chars: int) -> Extracted:
    """A PDF: its pages' text (``streams/pdf.py``), each page a section ``Page N`` (empty
    pages count but make none); title from ``/Title``, else the first line of text."""
    meta_title, pages = pdf_pages(body, url, max_chars, normalize_text)
    text = "\n\n".join(p for p in pages if p)
    title = _clean_title(meta_title) or _clean_title(_first_line(text.split("\n"), False))
    sections = tuple(Section((f"Page {n}",), p) for n, p in enumerate(pages, 1) if p)
    return Extracted(text=text, title=title, kind="pdf", sections=sections, flavor="pdf")


def extract_text(
    body: bytes,
    content_type: str | None,
    url: str,
    *,
    max_chars: int = MAX_TEXT_CHARS,
    max_depth: int = MAX_DEPTH,
    structured: bool = False,
) -> Extracted:
    """The indexable text of a fetched body, with its title (and with ``structured``, its
    sections: ``streams.structure``; the text is the same either way).

    HTML: the main content only (``<main>``/``[role=main]``/the one ``<article>``, else
    ``<body>``) without navigation, headers, footers, sidebars, scripts or forms, as
    newline-separated blocks with collapsed whitespace; title from ``<title>``, else the
    first ``<h1>``. Plain text, Markdown and reStructuredText: the text with normalised
    newlines; title from the first heading (``# `` in Markdown, an underlined line in
    reStructuredText), else the first non-empty line. PDF (``streams/pdf.py``): the text of
    each page, a section per page; title from the document's ``/Title``, else its first line.

    Raises a ``PageRefused`` (a ``ValueError``) naming the reason, so the caller can
    dead-letter the URL with its ``error_class``: ``UnsupportedContent`` for types that are
    not text (and encrypted or unreadable PDFs), ``PageTooDeep`` for HTML nested over
    ``max_depth``, ``PageTooLarge`` for text over ``max_chars`` characters.
    """
    mime, params = _parse_content_type(content_type)
    kind, flavor = _classify(mime, body, url)
    if kind == "pdf":
        out = _extract_pdf(body, url, max_chars)
    elif kind == "html":
        text = _decode(body, params.get("charset"), is_html=True)
        out = _extract_html(text, max_depth, structured)
    else:
        text = normalize_text(_decode(body, params.get("charset"), is_html=False))
        title = _clean_title(_text_title(text, flavor))
        out = Extracted(text=text, title=title, kind="text", flavor=flavor)
    if len(out.text) > max_chars:
        raise PageTooLarge(
            f"extracted text has {len(out.text)} characters, more than the limit {max_chars}"
        )
    if structured and kind == "text":  # after the size check: parse only what is kept
        out = replace(out, sections=tuple(sections_of(out.text, flavor)))
    return out
