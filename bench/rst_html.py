"""The Django docs as HTML pages, for the retrieval-quality bench's HTML query set.

Why render at all: the same questions over the same text in another format show whether a
chunker's quality survives the format (extraction, then chunking) and let LangChain's
``HTMLHeaderTextSplitter`` compete on the format it is made for. Sphinx is not a dependency,
so docutils renders each page alone, with every Sphinx role and directive the corpus uses
given a plain meaning close to Sphinx's output (a cross-reference shows its title or
target, an API description its signature then its body, ``versionadded`` its sentence, a
target-only directive such as ``.. setting::`` nothing). Messages are silenced
(``report_level=5``): an unknown construct stays visible as its source text, never stops a
page. Bench-only: docutils is a ``dev`` extra.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, cast

from docutils import nodes
from docutils.core import publish_string
from docutils.parsers.rst import Directive, directives, roles
from docutils.parsers.rst.states import Inliner

__all__ = ["RENDERER_VERSION", "render_html", "rendered_corpus"]

#: Bumped when the rendering changes, so cached pages are rendered again.
RENDERER_VERSION = "1"

#: Roles whose text Sphinx shows as code (``:setting:`DEBUG``` renders as ``DEBUG``).
_CODE_ROLES = frozenset(
    {"setting", "class", "attr", "meth", "func", "exc", "data", "mod", "djadmin", "djadminopt"}
    | {"ttag", "tfilter", "lookup", "fieldlookup", "envvar", "option", "file", "samp"}
    | {"program", "command", "obj"}
)
_ROLE_USE = re.compile(r"(?<![\w`]):([a-zA-Z][\w-]*(?::[\w-]+)?):`")
_TITLED = re.compile(r"^(.*?)\s*<([^<>]*)>$", re.DOTALL)


def _role_text(name: str, text: str) -> str:
    """What Sphinx shows for a cross-reference: its title, else its target (``~`` keeps the
    last dotted part, ``!`` is dropped)."""
    m = _TITLED.match(text)
    if m and m.group(1):
        return m.group(1)
    target = text.lstrip("!")
    if target.startswith("~"):
        target = target[1:].rsplit(".", 1)[-1]
    return target


def _sphinx_role(
    name: str,
    rawtext: str,
    text: str,
    lineno: int,
    inliner: Inliner,
    options: dict[str, Any] | None = None,
    content: Sequence[str] | None = None,
) -> tuple[list[nodes.Node], list[nodes.system_message]]:
    shown = _role_text(name, nodes.unescape(text))
    base = name.rsplit(":", 1)[-1].lower()
    node: nodes.Node = (
        nodes.literal(rawtext, shown) if base in _CODE_ROLES else nodes.inline(rawtext, shown)
    )
    return [node], []


class _Nothing(Directive):
    """Target-only directives (``setting``, ``templatetag``, ``module``, ``toctree``...):
    Sphinx renders an index entry or a link target, no text."""

    has_content = True
    optional_arguments = 10
    final_argument_whitespace = True
    option_spec: ClassVar[dict[str, Any]] = {}

    def run(self) -> list[nodes.Node]:
        return []


class _AnyOptions(dict[str, Any]):
    """Accepts every option (Sphinx directives have many the bench does not need)."""

    def __missing__(self, key: str) -> Any:
        return directives.unchanged


class _Literal(Directive):
    """``code-block``, ``console``, ``code``: the content as a literal block, unhighlighted."""

    has_content = True
    optional_arguments = 1
    final_argument_whitespace = True
    option_spec: ClassVar[dict[str, Any]] = _AnyOptions()

    def run(self) -> list[nodes.Node]:
        text = "\n".join(self.content)
        return [nodes.literal_block(text, text)]


class _Described(Directive):
    """An API description (``method``, ``class``, ``attribute``...): its signature as code,
    then its body, as Sphinx lays them out."""

    has_content = True
    required_arguments = 0
    optional_arguments = 1
    final_argument_whitespace = True
    option_spec: ClassVar[dict[str, Any]] = _AnyOptions()

    def run(self) -> list[nodes.Node]:
        out: list[nodes.Node] = []
        if self.arguments:
            sig = " ".join(self.arguments[0].split())
            out.append(nodes.paragraph("", "", nodes.literal(sig, sig)))
        if self.content:
            box = nodes.container()
            self.state.nested_parse(self.content, self.content_offset, box)
            out.append(box)
        return out


class _Versioned(Directive):
    """``versionadded`` / ``versionchanged`` / ``deprecated``: Sphinx's sentence, then the
    body."""

    has_content = True
    required_arguments = 1
    optional_arguments = 1
    final_argument_whitespace = True
    option_spec: ClassVar[dict[str, Any]] = {}
    _LEAD: ClassVar[dict[str, str]] = {
        "versionadded": "New in Django {}.",
        "versionchanged": "Changed in Django {}:",
        "deprecated": "Deprecated since version {}:",
    }

    def run(self) -> list[nodes.Node]:
        lead = self._LEAD.get(self.name, "{}").format(self.arguments[0])
        box = nodes.container()
        box += nodes.paragraph(lead, lead)
        if len(self.arguments) > 1:
            box += nodes.paragraph(self.arguments[1], self.arguments[1])
        if self.content:
            self.state.nested_parse(self.content, self.content_offset, box)
        return [box]


class _Box(Directive):
    """``seealso``, ``glossary``: the body in a container."""

    has_content = True
    optional_arguments = 1
    final_argument_whitespace = True
    option_spec: ClassVar[dict[str, Any]] = _AnyOptions()

    def run(self) -> list[nodes.Node]:
        box = nodes.container()
        if self.arguments:
            box += nodes.paragraph(self.arguments[0], self.arguments[0])
        self.state.nested_parse(self.content, self.content_offset, box)
        return [box]


_NOTHING = "setting fieldlookup templatefilter templatetag django-admin module currentmodule "
_NOTHING += "program index toctree envvar highlight"
_DESCRIBED = "attribute method class function exception data classmethod staticmethod "
_DESCRIBED += "describe object django-admin-option option decorator"


def _register() -> None:
    for name in _NOTHING.split():
        directives.register_directive(name, _Nothing)
    for name in ("code-block", "sourcecode", "code", "console"):
        directives.register_directive(name, _Literal)
    for name in _DESCRIBED.split():
        directives.register_directive(name, _Described)
    for name in ("versionadded", "versionchanged", "deprecated"):
        directives.register_directive(name, _Versioned)
    for name in ("seealso", "glossary"):
        directives.register_directive(name, _Box)


_register()


def render_html(rst: str) -> str:
    """One RST page as a standalone HTML5 document (title, ``h1``-``h6`` sections)."""
    for name in set(_ROLE_USE.findall(rst)):
        roles.register_local_role(name, cast(Any, _sphinx_role))
    out = publish_string(
        rst,
        writer="html5",
        settings_overrides={
            "report_level": 5,
            "halt_level": 5,
            "warning_stream": False,
            "embed_stylesheet": False,
            "stylesheet_path": "",
            "file_insertion_enabled": False,
            "raw_enabled": False,
            "syntax_highlight": "none",
            "input_encoding": "unicode",
            "output_encoding": "utf-8",
            "_disable_config": True,
        },
    )
    return out.decode("utf-8") if isinstance(out, bytes) else str(out)


def rendered_corpus(docs_root: Path, files: Sequence[str], cache_dir: Path) -> dict[str, Path]:
    """``file -> its HTML page``, rendered once into ``cache_dir`` (keyed by the source's
    hash and :data:`RENDERER_VERSION`): rendering all 656 pages takes about a minute."""
    out: dict[str, Path] = {}
    for rel in files:
        source = (docs_root / rel).read_text(encoding="utf-8")
        digest = hashlib.sha256(f"{RENDERER_VERSION}\0{source}".encode()).hexdigest()[:16]
        target = cache_dir / (rel.removesuffix(".txt") + f".{digest}.html")
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp")
            tmp.write_text(render_html(source), encoding="utf-8")
            tmp.replace(target)
        out[rel] = target
    return out
