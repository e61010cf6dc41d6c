#!/bin/bash
# The project's test command (README "Tests"): prepare the test venvs, lint,
# then run the suite against real klippy processes and the local Polar
# Cloud simulator.  Extra arguments go to pytest (e.g. -k register).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/testenv.sh
.venv/bin/ruff check --output-format concise .
exec .venv/bin/python -m pytest -m "not slow" -p no:cacheprovider "$@"
