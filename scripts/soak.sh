#!/bin/bash
# Long soak of polar_cloud in a real klippy (R27): random network faults,
# klippy restarts and cloud print jobs for a while, then checks that every
# job got exactly one terminal report and that threads, sockets and memory
# stayed flat.  Arguments go to tests/testbed/soak.py, e.g.
#   scripts/soak.sh --minutes 720 --fault-every 10 --job-every 20
# Needs the test venv (scripts/testenv.sh).  Exit status 0 means it passed;
# the samples are in <workdir>/soak.csv and the verdict in soak.json.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m tests.testbed.soak "$@"
