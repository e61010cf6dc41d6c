#!/bin/bash
# Register this host's Klipper printer(s) with Polar Cloud from the shell,
# without the PIN ever reaching G-code, a log or a shell history:
#
#   polar_cloud/scripts/register.sh --email you@school.org          # asks the PIN
#   polar_cloud/scripts/register.sh --email you@school.org --all    # every instance
#   polar_cloud/scripts/register.sh --email you@school.org --pin-file ~/pin.txt
#
# Run it as the user Klipper runs as.  --help lists every option.  The work
# is done by polar_register.py (Python standard library only).
#
# This file may be distributed under the terms of the GNU GPLv3 license.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)

find_python() {  # a Python 3.7 or newer: the system's, else klippy's
    local py
    for py in "${POLAR_PYTHON:-}" python3 "$HOME/klippy-env/bin/python"; do
        [ -n "$py" ] || continue
        if "$py" -c 'import sys; sys.exit(sys.version_info < (3, 7))' 2>/dev/null; then
            printf '%s\n' "$py"
            return 0
        fi
    done
    return 1
}

PY=$(find_python) || {
    printf 'register.sh: no Python 3.7 or newer found (python3 or ~/klippy-env/bin/python)\n' >&2
    exit 2
}
exec "$PY" "$HERE/polar_register.py" "$@"
