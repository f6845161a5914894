"""Render docs/configuration.md from the Settings model (``--check`` fails if it drifted)."""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import AliasChoices
from pydantic.fields import FieldInfo

from streams.settings import Settings

OUT = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def env_name(name: str, field: FieldInfo) -> str:
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return " / ".join(f"`{c}`" for c in alias.choices)
    if isinstance(alias, str):
        return f"`{alias}`"
    return f"`RAGSTREAM_{name.upper()}`"


def render() -> str:
    lines = [
        "# Configuration",
        "",
        "Every setting is an environment variable, read once into `streams.settings.Settings`.",
        "This page is generated from that class (`python scripts/config_doc.py`); a test keeps",
        "it in step.",
        "",
        "| variable | default | meaning |",
        "|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        default = field.default
        if name == "cache_dir":
            default = "~/.cache/ragstream"
        shown = f"`{default}`" if default not in ("", None) else "(empty)"
        lines.append(f"| {env_name(name, field)} | {shown} | {field.description or ''} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if OUT.read_text() == text else 1)
    OUT.write_text(text)
    print(f"wrote {OUT}")
