#!/usr/bin/env bash
# Run the test suite against a real Kafka broker that this script starts (and stops).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not faults"`.
#
# `bash scripts/test.sh --fast [pytest args]`: the fast tier, every test not marked `kafka`
# or `slow` (tests/conftest.py marks `kafka` whatever uses the broker fixture), property
# tests with fewer cases. It starts no broker; a test that asks for one fails instead.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAGSTREAM_HOME=${RAGSTREAM_TEST_HOME:-$PWD/.ragstream/test}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ ${1:-} == --fast ]]; then
    shift
    unset RAGSTREAM_TEST_BROKER RAGSTREAM_BROKER
    export RAGSTREAM_TEST_NO_BROKER=1
    # pytest exits 5 when no test ran: that fails here as any non-zero status does.
    exec .venv/bin/python -m pytest -m "not kafka and not slow" --hypothesis-profile=fast "$@"
fi
PORT=${RAGSTREAM_TEST_PORT:-19092}
export RAGSTREAM_BROKER=127.0.0.1:$PORT
.venv/bin/ragstream kafka up --port "$PORT"
trap '.venv/bin/ragstream kafka down >/dev/null || true' EXIT
export RAGSTREAM_TEST_BROKER=$RAGSTREAM_BROKER
# pytest exits 5 when no test ran: that fails here as any non-zero status does.
.venv/bin/python -m pytest "$@"
