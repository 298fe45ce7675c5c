#!/usr/bin/env bash
# The test suite, from a fresh clone: set up .venv, then run pytest (extra args pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec .venv/bin/python -m pytest -q --durations=15 "$@"
