#!/bin/bash
# The whole product on any machine: a simulated printer, a local Polar
# Cloud and the polar_cloud extra inside a real klippy.  See scripts/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/testenv.sh >/dev/null
exec .venv/bin/python scripts/demo.py "$@"
