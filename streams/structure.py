"""A page's structure before chunking: sections with their heading path and body text.

Why: chunking raw reStructuredText or Markdown spends tokens on markup the model learns
nothing from (every ``=`` of an underline is a MiniLM token: about a tenth of the Django
docs, a third of a FAQ page), cuts chunks right after a heading so that its answer starts
the next chunk, and leaves each chunk blind to where it sits. Parsed first, heading markup
becomes structure (each section's path: page title › section › subsection) and the chunker
(:func:`chunk_sections`) can keep a heading with its body and prefix each chunk with its path.

Pure and line-oriented on purpose: every parser here reads each line once with regular
expressions whose repetitions are bounded or stop at a delimiter, and keeps a stack no
deeper than the indentation (at most ``MAX_SPACE_RUN`` columns after ``sanitize``), so a
hostile page (4 MB on one line, 100,000 headings, a page of underlines, deep nesting) costs
time and memory linear in its size. docutils and a full Markdown parser would be more
faithful but are neither light nor bounded on hostile input; what they add (exact nesting
rules) changes little about which words land in which chunk.

Sections come out in document order; a section's ``path`` holds its headings from the top
(the page title is added by the chunker, which knows it); ``body`` is its text without the
heading, blocks separated by blank lines, code kept verbatim (dedented).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from streams.errors import TooManyChunks

if TYPE_CHECKING:
    from streams.chunking import Chunker

__all__ = [
    "MAX_HEADING_CHARS",
    "PATH_SEPARATOR",
    "Section",
    "chunk_sections",
    "page_path",
    "parse_markdown",
    "parse_plain",
    "parse_rst",
    "sections_of",
]

PATH_SEPARATOR = " › "
#: Longest heading kept in a path (a longer one is cut): a path is a chunk's first line.
MAX_HEADING_CHARS = 200
#: Longest section path (``Chunk.section``; the schema allows 8192): as long as a title, so
#: a chunks message stays as far below its caps as before.
MAX_PATH_CHARS = 512
#: How full a chunk of several small sections may get, as a share of the token budget (a
#: section alone may fill it all). Packing siblings to the whole budget embedded an FAQ
#: answer with its neighbours' and lost it; at half, over 69 Django questions
#: (``python -m bench quality --pages 44``, BENCHMARKS.md), recall@5 went from 0.812 to
#: 0.899 (dense) and 0.884 to 0.928 (hybrid) for 11 % more chunks and the same tokens.
PACK_SHARE = 0.5


@dataclasses.dataclass(frozen=True, slots=True)
class Section:
    """Headings from the top of the page down to this section, and its body text."""

    path: tuple[str, ...]
    body: str


_WS = re.compile(r"\s+")
_BLANKS = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")


def _heading(raw: str) -> str:
    text = _WS.sub(" ", raw).strip()
    return text[:MAX_HEADING_CHARS].rstrip()


def _body(lines: list[str]) -> str:
    """Lines to a body: at most one blank line in a row, no blank ends."""
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip("\n")


class _Builder:
    """Collects sections: body lines under the current heading path."""

    def __init__(self, inline: Callable[[str], str]) -> None:
        self.sections: list[Section] = []
        self.path: tuple[str, ...] = ()
        self.levels: tuple[int, ...] = ()
        self.lines: list[str] = []
        self.pending: list[str] = []  # text lines of the paragraph at hand
        self.inline = inline
        self.headings: list[str] = []  # the first few, for a page of headings only

    def text(self, line: str) -> None:
        """A line of running text: its inline markup is read with its paragraph's (a role
        or link may span lines)."""
        self.pending.append(line)

    def raw(self, line: str) -> None:
        """A line kept as it is (code, a blank line)."""
        self._settle()
        self.lines.append(line)

    def _settle(self) -> None:
        if self.pending:
            self.lines.append(self.inline("\n".join(self.pending)))
            self.pending = []

    def flush(self) -> None:
        self._settle()
        body = _body(self.lines)
        if body.strip():
            self.sections.append(Section(self.path, body))
        self.lines = []

    def heading(self, level: int, text: str) -> None:
        """A heading of ``level`` (smaller is higher): it replaces the same or deeper ones."""
        self.flush()
        keep = 0
        while keep < len(self.levels) and self.levels[keep] < level:
            keep += 1
        title = _heading(text)
        if title and len(self.headings) < _HEADINGS_ONLY:
            self.headings.append(title)
        if not title:
            self.path, self.levels = self.path[:keep], self.levels[:keep]
            return
        self.path = (*self.path[:keep], title)
        self.levels = (*self.levels[:keep], level)

    def done(self) -> list[Section]:
        """The sections; a page of headings and nothing else keeps its headings as text
        (they are all it says)."""
        self.flush()
        if not self.sections and self.headings:
            return [Section((), "\n".join(self.headings))]
        return self.sections


#: Headings kept for a page that has nothing but headings.
_HEADINGS_ONLY = 1000


# --- reStructuredText ---------------------------------------------------------------------

#: A line of one punctuation character repeated (a section adornment or a transition).
_ADORNMENT = re.compile(r"""([!-/:-@\[-`{-~])\1{2,}[ \t]*""")
#: Table borders: grid (``+---+---+``) and simple (``====  ====``).
_TABLE_BORDER = re.compile(r"\+(?:[-=]+\+){1,1000}[ \t]*|[=-]{2,}(?:[ \t]+[=-]{2,}){1,1000}[ \t]*")
_DIRECTIVE = re.compile(r"\.\.[ \t]+([A-Za-z][\w.+:-]{0,60})::(?:[ \t]+(.*))?")
_SUBSTITUTION = re.compile(r"\.\.[ \t]+\|[^|]{1,200}\|[ \t]+[\w.+:-]{1,60}::")
_TARGET = re.compile(r"\.\.[ \t]+_|__[ \t]")
_FOOTNOTE = re.compile(r"\.\.[ \t]+\[([^\]\s]{1,60})\][ \t]*(.*)")
_OPTION = re.compile(r":([\w-]{1,40}):(?:[ \t]+(.*))?")
#: Roles: ``:class:`~a.b.C``` (any number of role names, each short), with explicit title
#: ``:doc:`Title </path>``` or ``~`` (last component) or ``!`` (no link).
_ROLE = re.compile(r"(?::[A-Za-z][\w.+-]{0,40}){1,3}:`([^`]{1,1000})`")
_LITERAL = re.compile(r"``([^`]{1,1000})``")
#: Hyperlink references: ```text <url>`_`` -> text; ```text`_`` -> text.
_LINK = re.compile(r"`([^`]{1,1000})`(?:__?)?")
_STRONG = re.compile(r"\*\*([^*]{1,1000})\*\*")

_CODE_DIRECTIVES = frozenset(
    {
        "code-block",
        "code",
        "sourcecode",
        "doctest",
        "testcode",
        "testoutput",
        "testsetup",
        "console",
        "parsed-literal",
        "productionlist",
        "math",
    }
)
#: Directives whose argument and content are markup, not text.
_DROP_DIRECTIVES = frozenset(
    {
        "toctree",
        "contents",
        "index",
        "highlight",
        "currentmodule",
        "raw",
        "include",
        "literalinclude",
        "image",
        "meta",
        "tabularcolumns",
        "sectionauthor",
        "moduleauthor",
        "codeauthor",
        "default-role",
        "role",
        "default-domain",
        "sectnum",
        "target-notes",
        "spelling:word-list",
        "spelling",
        "autosummary",
        "only",
        "ifconfig",
    }
)
_ADMONITIONS = {
    "note": "Note",
    "warning": "Warning",
    "tip": "Tip",
    "hint": "Hint",
    "important": "Important",
    "caution": "Caution",
    "danger": "Danger",
    "attention": "Attention",
    "error": "Error",
    "seealso": "See also",
    "todo": "To do",
    "admonition": "",
}
_VERSIONS = {
    "versionadded": "New in version",
    "versionchanged": "Changed in version",
    "deprecated": "Deprecated since version",
    "versionremoved": "Removed in version",
}
#: Options whose value is text worth keeping (others: ``:linenos:``, ``:maxdepth: 2``...).
_TEXT_OPTIONS = frozenset({"synopsis", "caption", "title"})


def _titled(inner: str) -> tuple[str, str]:
    """``("Title", "target")`` of ``Title <target>``; ``("", inner)`` without a title."""
    if inner.endswith(">"):
        at = inner.rfind("<")
        if at >= 0:
            return inner[:at].strip(), inner[at + 1 : -1]
    return "", inner


def _role(m: re.Match[str]) -> str:
    title, inner = _titled(_WS.sub(" ", m.group(1)).strip())
    if title:
        return title
    if inner.startswith("!"):
        inner = inner[1:]
    if inner.startswith("~"):
        inner = inner[1:].rsplit(".", 1)[-1]
    return inner


def _link(m: re.Match[str]) -> str:
    title, inner = _titled(_WS.sub(" ", m.group(1)).strip())
    return title or inner


def rst_inline(text: str) -> str:
    """Inline markup to its words: roles to their target or title, literals unquoted,
    hyperlink references to their text. Linear: every repetition is bounded."""
    if "`" in text:
        text = _ROLE.sub(_role, text)
        text = _LITERAL.sub(r"\1", text)
        text = _LINK.sub(_link, text)
    if "**" in text:
        text = _STRONG.sub(r"\1", text)
    return text


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def _is_adornment(line: str) -> bool:
    return bool(line) and line[0] in _ADORNMENT_CHARS and _ADORNMENT.fullmatch(line) is not None


_ADORNMENT_CHARS = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


@dataclasses.dataclass(slots=True)
class _Frame:
    """An indented block: its opener's indent and what its content is."""

    indent: int
    mode: str  # "code" | "drop" | "text"
    options: bool = False  # directive options may still follow (until a blank line)
    base: int = -1  # code: the first content line's indent


def parse_rst(text: str) -> list[Section]:
    """reStructuredText to sections.

    Titles: a line under (and optionally over) an adornment of one repeated punctuation
    character; levels in order of first appearance of each (character, overline) style.
    Directives: code keeps its content verbatim; admonitions and version notes become a
    readable lead (``Note:``, ``New in version 5.0:``); object descriptions keep their
    argument (``Field.null``); index, toctree, targets, comments and substitutions go.
    ``::`` literal blocks are code; table borders and transitions go.
    """
    lines = text.split("\n")
    out = _Builder(rst_inline)
    styles: dict[tuple[str, bool], int] = {}
    stack: list[_Frame] = []
    n = len(lines)
    i = 0
    while i < n:
        line = lines[i]
        stripped = line.strip()
        if not stripped:
            if stack and stack[-1].mode == "drop":
                i += 1
                continue
            if stack:
                stack[-1].options = False
            out.raw("")
            i += 1
            continue
        ind = _indent(line)
        while stack and ind <= stack[-1].indent:
            stack.pop()
        frame = stack[-1] if stack else None
        if frame is not None and frame.mode == "drop":
            i += 1
            continue
        if frame is not None and frame.options:
            opt = _OPTION.fullmatch(stripped)
            if opt:
                if opt.group(1) in _TEXT_OPTIONS and opt.group(2):
                    out.text(opt.group(2).strip())
                i += 1
                continue
            frame.options = False
        if frame is not None and frame.mode == "code":
            if frame.base < 0:
                frame.base = ind
            out.raw(line[min(ind, frame.base) :].rstrip())
            i += 1
            continue
        # Section titles: only at the top level (not inside any indented block).
        if frame is None and ind == 0:
            title = _rst_title(lines, i)
            if title is not None:
                heading, char, over, consumed = title
                level = styles.setdefault((char, over), len(styles))
                out.heading(level, rst_inline(heading))
                i += consumed
                continue
        if _is_adornment(stripped) or _TABLE_BORDER.fullmatch(stripped):
            i += 1  # a transition, a stray adornment or a table border: markup only
            continue
        if stripped.startswith(".."):
            i += 1
            _rst_explicit(stripped, ind, stack, out)
            continue
        if stripped.endswith("::"):
            lead = stripped[:-2].rstrip()
            if lead:
                # "Like this::" reads "Like this:"; "Like this ::" reads "Like this".
                out.text(lead + (":" if stripped[-3:-2] != " " else ""))
            stack.append(_Frame(ind, "code"))
            i += 1
            continue
        out.text(stripped)
        i += 1
    return out.done()


def _rst_title(lines: list[str], i: int) -> tuple[str, str, bool, int] | None:
    """``(title, char, overlined, lines used)`` when a section title starts at line ``i``."""
    line = lines[i].rstrip()
    n = len(lines)
    if _is_adornment(line):
        # Overline, title, underline of the same character.
        if i + 2 < n:
            mid, under = lines[i + 1].strip(), lines[i + 2].rstrip()
            if mid and not _is_adornment(mid) and _is_adornment(under) and under[0] == line[0]:
                return mid, line[0], True, 3
        return None
    if i + 1 >= n or (i > 0 and lines[i - 1].strip()):
        return None  # a title is a paragraph of one line
    under = lines[i + 1].rstrip()
    if not _is_adornment(under):
        return None
    if len(under) < min(len(line), 4):
        return None  # "Some words\n---": too short for a title, read as text and a rule
    return line.strip(), under[0], False, 2


def _rst_explicit(stripped: str, ind: int, stack: list[_Frame], out: _Builder) -> None:
    """One explicit markup line (``.. something``): what it says and what its block is."""
    if _SUBSTITUTION.match(stripped) or _TARGET.match(stripped):
        stack.append(_Frame(ind, "drop"))
        return
    m = _DIRECTIVE.fullmatch(stripped)
    if m is None:
        foot = _FOOTNOTE.fullmatch(stripped)
        if foot:
            out.text(f"[{foot.group(1)}] {foot.group(2)}".strip())
            stack.append(_Frame(ind, "text"))
            return
        stack.append(_Frame(ind, "drop"))  # a comment, with its indented block
        return
    name = m.group(1).lower()
    arg = (m.group(2) or "").strip()
    short = name.rsplit(":", 1)[-1]
    if name in _DROP_DIRECTIVES or short in _DROP_DIRECTIVES:
        stack.append(_Frame(ind, "drop"))
        return
    if short in _CODE_DIRECTIVES:
        stack.append(_Frame(ind, "code", options=True))
        return
    if short in _ADMONITIONS:
        label = _ADMONITIONS[short]
        lead = f"{label}: {arg}" if label and arg else (arg or f"{label}:")
        out.text(lead)
    elif short in _VERSIONS:
        version, _, rest = arg.partition(" ")
        lead = f"{_VERSIONS[short]} {version}:" if version else f"{_VERSIONS[short]}:"
        out.text(f"{lead} {rest.strip()}".strip())
    elif arg:
        out.text(arg)  # .. attribute:: Field.null -> "Field.null"
    stack.append(_Frame(ind, "text", options=True))


# --- Markdown -----------------------------------------------------------------------------

_MD_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})(.*)")
_MD_ATX = re.compile(r" {0,3}(#{1,6})(?:[ \t]+(.*))?")
_MD_ATX_CLOSE = re.compile(r"(?:^|[ \t]+)#+[ \t]*$")
_MD_ATTRS = re.compile(r"[ \t]*\{#[^{}]{0,200}\}[ \t]*$")
_MD_SETEXT = re.compile(r" {0,3}(=+|-+)[ \t]*")
_MD_HR = re.compile(r" {0,3}(?:(?:\*[ \t]*){3,}|(?:-[ \t]*){3,}|(?:_[ \t]*){3,})")
_MD_REFDEF = re.compile(r" {0,3}\[[^\]\n]{1,1000}\]:[ \t]*\S+.*")
_MD_TABLE_RULE = re.compile(
    r"[ \t]*\|?[ \t]*:?-{1,1000}:?[ \t]*(?:\|[ \t]*:?-{1,1000}:?[ \t]*){0,1000}\|?[ \t]*"
)
_MD_DEST = r"\([^()\s]{0,2000}(?:[ \t]+\"[^\"\n]{0,1000}\")?\)"
_MD_IMAGE = re.compile(r"!\[([^\[\]\n]{0,1000})\]" + _MD_DEST)
_MD_LINK = re.compile(r"\[([^\[\]\n]{1,1000})\](?:" + _MD_DEST + r"|\[[^\[\]\n]{0,1000}\])")
_MD_CODE = re.compile(r"(`{1,3})([^`\n]{1,1000})\1")
_MD_STRONG = re.compile(r"\*\*([^*]{1,1000})\*\*")
_MD_COMMENT = re.compile(r"<!--[^<>]{0,2000}-->")
_MD_LIST_ITEM = re.compile(r" {0,3}(?:[-*+]|\d{1,9}[.)])[ \t]")
_FRONT_MATTER_LINES = 200


def md_inline(text: str) -> str:
    """Inline Markdown to its words: links and images to their text, code unquoted, strong
    emphasis unmarked, HTML comments dropped. Linear: every repetition is bounded."""
    if "](" in text or "][" in text:
        text = _MD_IMAGE.sub(r"\1", text)
        text = _MD_LINK.sub(r"\1", text)
    if "`" in text:
        text = _MD_CODE.sub(r"\2", text)
    if "**" in text:
        text = _MD_STRONG.sub(r"\1", text)
    if "<!--" in text:
        text = _MD_COMMENT.sub("", text)
    return text


def _front_matter_end(lines: list[str]) -> int:
    """Lines taken by YAML (``---``) or TOML (``+++``) front matter at the top, else 0."""
    if not lines or lines[0].strip() not in ("---", "+++"):
        return 0
    fence = lines[0].strip()
    ends = ("---", "...") if fence == "---" else ("+++",)
    for k in range(1, min(len(lines), _FRONT_MATTER_LINES)):
        if lines[k].strip() in ends:
            return k + 1
    return 0


def parse_markdown(text: str) -> list[Section]:
    """Markdown to sections: ATX (``#``) and setext headings, fenced code kept verbatim
    without its fences (a ``#`` inside a fence is code, never a heading), front matter,
    link reference definitions and rules dropped, table delimiter rows dropped, links and
    images to their text."""
    lines = text.split("\n")
    out = _Builder(md_inline)
    i = _front_matter_end(lines)
    n = len(lines)
    fence: tuple[str, int] | None = None  # (character, length) of the open fence
    para = 0  # lines of the current paragraph in out.lines (for setext headings)
    while i < n:
        line = lines[i]
        if fence is not None:
            m = _MD_FENCE.fullmatch(line)
            closes = m is not None and m.group(1)[0] == fence[0] and len(m.group(1)) >= fence[1]
            if closes and m is not None and not m.group(2).strip():
                fence = None
                out.raw("")
                i += 1
                continue
            out.raw(line.rstrip())
            i += 1
            continue
        stripped = line.strip()
        if not stripped:
            out.raw("")
            para = 0
            i += 1
            continue
        m = _MD_FENCE.fullmatch(line)
        if m and not (m.group(1)[0] == "`" and "`" in m.group(2)):
            fence = (m.group(1)[0], len(m.group(1)))
            out.raw("")
            para = 0
            i += 1
            continue
        atx = _MD_ATX.fullmatch(line)
        if atx:
            title = (atx.group(2) or "")[: 4 * MAX_HEADING_CHARS].rstrip()
            title = _MD_ATTRS.sub("", _MD_ATX_CLOSE.sub("", title))
            out.heading(len(atx.group(1)), md_inline(title))
            para = 0
            i += 1
            continue
        setext = _MD_SETEXT.fullmatch(line)
        if setext and para:
            heading_lines = out.pending[-para:]
            del out.pending[-para:]
            out.heading(1 if setext.group(1)[0] == "=" else 2, " ".join(heading_lines))
            para = 0
            i += 1
            continue
        if _MD_HR.fullmatch(line) or _MD_REFDEF.fullmatch(line):
            para = 0
            i += 1
            continue
        if "-" in stripped and "|" in stripped and _MD_TABLE_RULE.fullmatch(line):
            i += 1
            continue
        out.text(line.rstrip())
        # A setext underline turns the paragraph above it into a heading; a list item or
        # a table row is not one.
        para = 0 if _MD_LIST_ITEM.match(line) or "|" in stripped else para + 1
        i += 1
    return out.done()


# --- plain text and dispatch ----------------------------------------------------------------


def parse_plain(text: str) -> list[Section]:
    """Plain text: one section without headings (the page title names it)."""
    return [Section((), text)] if text.strip() else []


def sections_of(text: str, flavor: str) -> list[Section]:
    """The sections of extracted text by flavor (``rst``, ``md``, anything else plain)."""
    if flavor == "rst":
        return parse_rst(text)
    if flavor == "md":
        return parse_markdown(text)
    return parse_plain(text)


# --- chunking by structure ------------------------------------------------------------------


def _same(a: str, b: str) -> bool:
    """Whether a heading repeats the page title (``Models`` in ``Models | Django docs``)."""
    a, b = a.casefold(), b.casefold()
    return bool(a) and bool(b) and (a in b or b in a)


def page_path(title: str | None, path: Sequence[str]) -> tuple[str, ...]:
    """A section's full path: the page title, then its headings (the title once, even when
    the first heading repeats it: an HTML ``<title>`` usually holds the ``<h1>`` and the
    site's name, and the heading is the shorter, better line)."""
    if not path:
        return (title,) if title else ()
    if title and not _same(title, path[0]):
        return (_heading(title), *path)
    return tuple(path)


def _labelled(line: str, body: str) -> str:
    """``body`` under its path line, unless it already starts with that line: a plain-text
    page is titled by its own first line, and a page of one line would read twice."""
    if not line or body == line or body.startswith(line + "\n"):
        return body
    return f"{line}\n\n{body}"


def _join(path: Sequence[str]) -> str:
    """A path as one line within ``MAX_PATH_CHARS``: middle headings give way first."""
    line = PATH_SEPARATOR.join(path)
    if len(line) <= MAX_PATH_CHARS:
        return line
    parts = list(path)
    while len(parts) > 2 and len(PATH_SEPARATOR.join(parts)) > MAX_PATH_CHARS:
        del parts[1]
    line = PATH_SEPARATOR.join(parts)
    return line[:MAX_PATH_CHARS].rstrip()


def _common(a: Sequence[str], b: Sequence[str]) -> int:
    k = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        k += 1
    return k


@dataclasses.dataclass(slots=True)
class _Piece:
    path: tuple[str, ...]
    body: str
    tokens: int  # of the body alone


class _Packer:
    """Turns sections into ``(section path, chunk text)`` within one chunker's budget."""

    def __init__(self, chunker: Chunker, max_chunks: int | None) -> None:
        self.chunker = chunker
        self.max_chunks = max_chunks
        self.out: list[tuple[str, str]] = []
        self._prefix: dict[tuple[str, ...], tuple[str, int]] = {}
        self._heading_tokens: dict[str, int] = {}
        # The path line may take at most a quarter of a chunk; the body keeps the rest.
        self.prefix_tokens = max(1, chunker.max_tokens // 4)
        self.prefix_chars = max(1, chunker.max_chars // 4)
        self.prefix_bytes = max(4, chunker.max_bytes // 4)

    # --- measures -----------------------------------------------------------------------

    def prefix(self, path: tuple[str, ...]) -> tuple[str, int]:
        """The path line for ``path`` within the prefix caps, and its tokens."""
        hit = self._prefix.get(path)
        if hit is None:
            line = _join(path)[: self.prefix_chars]
            raw = line.encode("utf-8", "surrogatepass")
            if len(raw) > self.prefix_bytes:
                line = raw[: self.prefix_bytes].decode("utf-8", "ignore")
            line = self.chunker.truncate(line, self.prefix_tokens).strip()
            (count,) = self.chunker.count_tokens([line]) if line else (0,)
            if len(self._prefix) >= 4096:  # a hostile page's many paths: memory stays flat
                self._prefix.clear()
            hit = self._prefix[path] = (line, count)
        return hit

    def heading_tokens(self, heading: str) -> int:
        hit = self._heading_tokens.get(heading)
        if hit is None:
            (hit,) = self.chunker.count_tokens([heading])
            if len(self._heading_tokens) >= 4096:
                self._heading_tokens.clear()
            self._heading_tokens[heading] = hit
        return hit

    def contribution(self, piece: _Piece, k: int) -> int:
        """Tokens ``piece`` adds under a common path of ``k`` headings (its own headings
        below them, a separator each, then its body)."""
        return piece.tokens + sum(self.heading_tokens(h) + 1 for h in piece.path[k:])

    def within(self, text: str) -> bool:
        c = self.chunker
        if len(text) > c.max_chars or len(text.encode("utf-8", "surrogatepass")) > c.max_bytes:
            return False
        (count,) = c.count_tokens([text])
        return count <= c.max_tokens

    # --- output -------------------------------------------------------------------------

    def emit(self, section: str, text: str) -> None:
        self.out.append((section, text))
        if self.max_chunks is not None and len(self.out) > self.max_chunks:
            raise TooManyChunks(f"the page makes more than {self.max_chunks} chunks (the limit)")

    @staticmethod
    def common(group: list[_Piece]) -> int:
        """Headings every piece of ``group`` shares (at least the page title)."""
        first = group[0].path
        k = min((_common(first, p.path) for p in group[1:]), default=len(first))
        return max(k, min(1, len(first)))

    def render(self, group: list[_Piece]) -> tuple[str, str]:
        """``(section, text)`` of sections packed under their common path."""
        k = self.common(group)
        line, _ = self.prefix(group[0].path[:k])
        parts = []
        for p in group:
            rel = _heading(PATH_SEPARATOR.join(p.path[k:]))
            parts.append(f"{rel}\n{p.body}" if rel else p.body)
        return line, _labelled(line, "\n\n".join(parts))

    def flush(self, group: list[_Piece]) -> None:
        """Emit a packed group; halve it when its real count is over budget (the counts of
        parts need not add up exactly), cut a single section that is."""
        if not group:
            return
        section, text = self.render(group)
        if self.within(text):
            self.emit(section, text)
        elif len(group) > 1:
            half = len(group) // 2
            self.flush(group[:half])
            self.flush(group[half:])
        else:
            self.split(group[0])

    def split(self, piece: _Piece) -> None:
        """A section over budget: its body cut by the token chunker (its break scoring),
        every piece under the section's full path."""
        line, tokens = self.prefix(piece.path)
        c = self.chunker
        extra = len(line) + 2 if line else 0
        body_chunker = c.derive(
            max_tokens=max(1, c.max_tokens - tokens - (1 if line else 0)),
            max_chars=max(16, c.max_chars - extra),
            max_bytes=max(64, c.max_bytes - (len(line.encode("utf-8", "surrogatepass")) + 2)),
        )
        for s, e in body_chunker.chunk_spans(piece.body):
            body = piece.body[s:e]
            text = _labelled(line, body)
            if line and not self.within(text):
                text = body  # the counts did not add up: the body alone, still labelled
            self.emit(line, text)

    def pack(self, sections: Sequence[Section], title: str | None) -> list[tuple[str, str]]:
        budget = self.chunker.max_tokens
        group: list[_Piece] = []
        k = 0  # headings the group shares
        total = 0  # its estimated tokens
        for start in range(0, len(sections), 256):
            batch = sections[start : start + 256]
            # A body over the character cap is cut whatever its tokens: not counted (a
            # hostile page's megabytes are tokenized once, by the cut, not twice).
            limit = self.chunker.max_chars
            counts = self.chunker.count_tokens(
                [s.body if len(s.body) <= limit else "" for s in batch]
            )
            counts = [
                c if len(s.body) <= limit else budget + 1
                for s, c in zip(batch, counts, strict=True)
            ]
            for sec, count in zip(batch, counts, strict=True):
                piece = _Piece(page_path(title, sec.path), sec.body, count)
                if group:
                    first = group[0].path
                    shared = min(k, _common(first, piece.path))
                    # One parent's sections: siblings and descendants of the first's parent;
                    # a group still under half a chunk takes what follows in the page too
                    # (a fragment alone embeds worse than with its neighbours).
                    if shared >= max(1, len(first) - 1) or (shared >= 1 and total * 2 < budget):
                        if shared < k:  # the common path got shorter: headings move down
                            trial = self.prefix(first[:shared])[1] + sum(
                                self.contribution(p, shared) for p in group
                            )
                        else:
                            trial = total
                        trial += self.contribution(piece, shared)
                        if trial <= budget * PACK_SHARE:
                            group.append(piece)
                            k, total = shared, trial
                            continue
                    self.flush(group)
                group = [piece]
                k = len(piece.path)
                total = self.prefix(piece.path)[1] + count
                if total > budget:
                    self.flush(group)  # too long alone: cut at once
                    group = []
        self.flush(group)
        return self.out


def chunk_sections(
    sections: Sequence[Section],
    title: str | None,
    chunker: Chunker,
    *,
    max_chunks: int | None = None,
) -> list[tuple[str, str]]:
    """``(section path, chunk text)`` of a page's sections, in order.

    A chunk's text starts with its section path (``Page › Section › Subsection``) and a
    blank line: the model embeds where the text sits, so a paragraph that never names its
    topic is still found through it. Consecutive small sections of one parent share a chunk
    (under their common path, each with its own heading); a section too long for one chunk
    is cut by the token chunker, each piece under the section's path, so a heading is never
    a chunk's last line. Every chunk is within ``chunker.max_tokens``, ``max_chars`` and
    ``max_bytes`` (the path line takes at most a quarter of each).

    Raises ``TooManyChunks`` as soon as more than ``max_chunks`` chunks are made, so a
    hostile page stops early.
    """
    return _Packer(chunker, max_chunks).pack(sections, title)
