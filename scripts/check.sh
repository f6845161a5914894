#!/usr/bin/env bash
# Static checks, as CI runs them: ruff (lint and format) over the tree, then mypy over the
# packages listed in pyproject.toml's [tool.mypy] `files`. No broker, no model: seconds
# once mypy's cache (.mypy_cache/) is warm, about a minute cold.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
