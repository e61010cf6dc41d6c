#!/bin/bash
# Create .venv-moonraker: a real Moonraker from PyPI for the integration
# tests (tests/klippy/test_moonraker.py, tests/klippy/test_web_page.py), kept apart from the
# klippy venvs.  Idempotent: a venv whose stamp matches MOONRAKER_PKG and
# the Python in use is left alone.  Tests call it; so can a developer.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MOONRAKER_PKG="moonraker==0.11.0"
DIR=${MOONRAKER_VENV:-.venv-moonraker}

# Two test runs starting at once must not build the venv twice.
exec 9<"$0"
flock 9

stamp="$MOONRAKER_PKG-$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ -f "$DIR/.stamp" ] && [ "$(cat "$DIR/.stamp")" = "$stamp" ]; then
    exit 0
fi
rm -rf "$DIR"
"$PY" -m venv "$DIR"
"$DIR/bin/pip" install -q --disable-pip-version-check "$MOONRAKER_PKG"
"$DIR/bin/python" -c 'import moonraker.server' \
    || { echo "moonraker_env.sh: $MOONRAKER_PKG does not import" >&2; exit 1; }
echo "$stamp" > "$DIR/.stamp"
echo "moonraker venv ready: $DIR ($MOONRAKER_PKG)"
