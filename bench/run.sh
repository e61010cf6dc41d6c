#!/bin/bash
# polar_cloud benchmarks (not part of the test suite): what the module costs
# klippy and how fast it reacts, each figure against klippy without
# [polar_cloud] in the same run.  `bench/run.sh --quick` for 60 s windows.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m bench "$@"
