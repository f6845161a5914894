"""docs/architecture.md matches the tree, and the imports run the way it says. No broker.

The map is only worth reading while it is true: every path and dotted name it writes in
backticks exists, every module of the packages is on it, and no package imports "upwards"
(a core that imports an operations library is a core that cannot be tested alone).
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"

#: The packages whose every module the map must name.
MAPPED = ("streams", "agents", "ops", "devtools", "ragstream/cli")
#: Top-level folders the map must name besides them.
FOLDERS = (
    "streams",
    "agents",
    "ops",
    "devtools",
    "ragstream/cli",
    "bench",
    "schemas",
    "tests",
    "scripts",
    "docs",
)

#: package -> the packages of this repository it must never import (the import direction:
#: streams <- agents <- ops <- ragstream.cli; devtools uses streams only; bench and tests may
#: use everything).
FORBIDDEN: dict[str, frozenset[str]] = {
    "streams": frozenset({"agents", "ops", "ragstream", "devtools", "bench", "tests"}),
    "agents": frozenset({"ops", "ragstream", "devtools", "bench", "tests"}),
    "ops": frozenset({"ragstream", "bench", "tests"}),
    "devtools": frozenset({"agents", "ops", "ragstream", "bench", "tests"}),
    "ragstream": frozenset({"bench", "tests"}),
}

_PATH_EXT = (".py", ".md", ".json", ".xml", ".sh", ".toml", ".yml", ".txt")
_TICKED = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
_DOTTED = re.compile(r"^(streams|agents|ops|devtools|ragstream|bench)(\.[A-Za-z_]\w*)+$")


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _ticked(text: str) -> list[str]:
    return [m.strip() for m in _TICKED.findall(text)]


def _is_path(token: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]*)*", token)) and (
        "/" in token or token.endswith(_PATH_EXT)
    )


def _module_file(parts: list[str]) -> Path | None:
    base = ROOT.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _defines(file: Path, names: list[str]) -> bool:
    """``names[0]`` is defined at the top of ``file`` (``names[1]``, if any, inside it)."""
    body = ast.parse(file.read_text(encoding="utf-8")).body
    for name in names:
        found = None
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                if node.name == name:
                    found = node
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    found = node
            elif isinstance(node, ast.ImportFrom | ast.Import) and any(
                (a.asname or a.name) == name for a in node.names
            ):
                found = node
        if found is None:
            return False
        body = getattr(found, "body", [])
    return True


def _dotted_exists(token: str) -> bool:
    """``streams.documents.plan_update``: a module, then at most two names defined in it."""
    parts = token.split(".")
    for cut in range(len(parts), 0, -1):
        file = _module_file(parts[:cut])
        if file is not None:
            rest = parts[cut:]
            return len(rest) <= 2 and (not rest or _defines(file, rest))
    return False


def _tracked(folder: str) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", folder],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line for line in out.splitlines() if line]


def _modules(folder: str) -> list[str]:
    """The package's own modules (``__init__``/``__main__`` are the folder itself)."""
    return sorted(
        p
        for p in _tracked(folder)
        if p.endswith(".py")
        and p.count("/") == folder.count("/") + 1
        and Path(p).name not in ("__init__.py", "__main__.py")
        and (ROOT / p).is_file()
    )


# --- the doc names only what exists -------------------------------------------------------


def test_every_path_and_name_in_backticks_exists() -> None:
    missing = []
    for token in _ticked(_doc()):
        if _is_path(token):
            if not (ROOT / token.rstrip("/")).exists():
                missing.append(token)
        elif _DOTTED.match(token) and not _dotted_exists(token):
            missing.append(token)
    assert missing == [], f"docs/architecture.md names what is not in the tree: {missing}"


def _top_level_names() -> set[str]:
    names: set[str] = set()
    for package in ("streams", "agents", "ops", "devtools", "ragstream"):
        for path in _tracked(package):
            if path.endswith(".py") and (ROOT / path).is_file():
                tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
                names |= {
                    n.name
                    for n in tree.body
                    if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                }
    return names


def test_every_class_named_in_backticks_exists() -> None:
    """A bare ``CamelCase`` name (``FetchFailed``, ``UrlRequest``) is a class of ours."""
    names = _top_level_names()
    classes = {t for t in _ticked(_doc()) if re.fullmatch(r"[A-Z][a-z]+[A-Z]\w*|[A-Z][a-z]+", t)}
    assert classes, "no class names found: is the pattern right?"
    assert sorted(classes - names) == []


def test_every_link_resolves() -> None:
    broken = [
        target
        for target in _LINK.findall(_doc())
        if "://" not in target and not (DOC.parent / target).exists()
    ]
    assert broken == []


# --- the doc names everything there is ----------------------------------------------------


def test_every_folder_is_on_the_map() -> None:
    ticked = set(_ticked(_doc()))
    assert [f for f in FOLDERS if f"{f}/" not in ticked] == []


@pytest.mark.parametrize("folder", MAPPED)
def test_every_module_is_on_the_map(folder: str) -> None:
    ticked = set(_ticked(_doc()))
    modules = _modules(folder)
    assert modules, f"no modules found under {folder}/"
    assert [m for m in modules if m not in ticked] == [], (
        f"modules of {folder}/ missing from docs/architecture.md (name each as `path.py`)"
    )


# --- the imports run one way ---------------------------------------------------------------


def _imports(file: Path) -> list[tuple[int, str]]:
    """Every module ``file`` imports, lazily or not (a function-level import counts too)."""
    found = []
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def upward_imports(package: str) -> list[str]:
    forbidden = FORBIDDEN[package]
    wrong = []
    for path in _tracked(package):
        if not path.endswith(".py") or not (ROOT / path).is_file():
            continue
        for line, module in _imports(ROOT / path):
            if module.split(".")[0] in forbidden:
                wrong.append(f"{path}:{line} imports {module}")
    return wrong


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_run_one_way(package: str) -> None:
    assert upward_imports(package) == []


def test_the_doc_states_the_direction_the_test_enforces() -> None:
    assert "streams ← agents ← ops ← ragstream.cli" in _doc()


# --- the docs copy no default wrongly ------------------------------------------------------

#: ``RAGSTREAM_X`` (30), (3,600 s), (24 h), (1 MiB), (8/s), (default 3): a default written
#: beside its variable, where a reader needs the number (the limits tables of security.md).
_COPIED = re.compile(r"`((?:RAGSTREAM|MILVUS)_[A-Z0-9_]+)`,? \((?:default )?([^);]*)[);]")
_VALUE = re.compile(r"`?(\d[\d,. ]*?)`?\s*(s|h|MiB|/s)?")
#: A table row that copies a default: ``| `RAGSTREAM_X` | `value` | ...``.
_ROW = re.compile(r"^\| `((?:RAGSTREAM|MILVUS)_[A-Z0-9_]+)` \| `([^`]*)` \|", re.MULTILINE)
_UNIT = {None: 1, "s": 1, "/s": 1, "h": 3600, "MiB": 1 << 20}


def _defaults() -> dict[str, object]:
    from streams.settings import Settings

    out: dict[str, object] = {}
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        keys = list(alias.choices) if alias is not None else [f"RAGSTREAM_{name.upper()}"]
        out.update(dict.fromkeys(keys, field.default))
    return out


def _same(written: str, unit: str | None, default: object) -> bool:
    if isinstance(default, bool) or not isinstance(default, int | float):
        return written.replace(" ", "") == str(default)
    try:
        return float(written.replace(",", "")) * _UNIT[unit] == float(default)
    except ValueError:
        return False


def test_defaults_written_in_the_docs_are_the_code_s() -> None:
    """configuration.md is generated; a default copied elsewhere must still be the code's."""
    defaults = _defaults()
    seen, wrong = 0, []
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for doc in docs:
        if doc.name == "configuration.md":
            continue
        text = doc.read_text(encoding="utf-8")
        copies: list[tuple[str, str, str | None]] = []
        for var, written in _COPIED.findall(text):
            written = written.strip()
            if (m := _VALUE.fullmatch(written)) is not None:
                copies.append((var, m[1], m[2]))
            elif (q := re.fullmatch(r"`([^`]*)`", written)) is not None:
                copies.append((var, q[1], None))
        copies += [(var, written, None) for var, written in _ROW.findall(text)]
        for var, written, unit in copies:
            seen += 1
            if not _same(written, unit, defaults[var]):
                wrong.append(
                    f"{doc.name}: {var} ({written} {unit or ''}) but the code has {defaults[var]!r}"
                )
    assert seen >= 10, "the patterns found almost nothing: are they still right?"
    assert wrong == []
