#!/bin/bash
# Install, repair or remove the polar_cloud Klipper extra (Polar Cloud).
#
# Run as the user Klipper runs as, from a git clone of this repository:
#   ./install.sh            install or repair (safe to run again)
#   ./install.sh --all      the same for every Klipper instance on this host
#   ./install.sh -u         uninstall (keeps the printer's identity)
# ./install.sh -h lists every option. Nothing is asked: flags only.
# Helpers: scripts/install_helper.py (instances, config files, Moonraker's
# API, pip with Klipper's packages held) and scripts/install_nginx.sh.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
set -euo pipefail
export LC_ALL=C

# Debian packages (Moonraker reads the same list from
# system-dependencies.json): what pip needs to build Pillow where it finds
# no wheel, installed when missing, and ffmpeg, which makes the timelapses
# of cloud prints: Moonraker installs it on update, install.sh only when
# asked (--timelapse).
PKGLIST="python3-dev libjpeg-dev zlib1g-dev build-essential ffmpeg"

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
PKG_DIR=$REPO_DIR/klippy_extras/polar_cloud
HELPER=$REPO_DIR/scripts/install_helper.py
DEFAULT_ORIGIN=https://github.com/polar-cloud-klipper/polar_cloud
UM_FILE=polar_cloud_update.conf   # install_helper.py's UM_FILE
# Test hook, not for normal use: a stand-in for `id -u` (the helper reads
# POLAR_SYSTEMD_DIR, install_nginx.sh POLAR_NGINX_DIR).
RUN_UID=${POLAR_INSTALL_UID:-$(id -u)}
FFMPEG=${POLAR_FFMPEG:-ffmpeg}      # test hook: a stand-in ffmpeg command

say()  { printf 'polar_cloud: %s\n' "$*"; }
warn() { printf 'polar_cloud: WARNING: %s\n' "$*" >&2; }
die()  { printf 'polar_cloud: ERROR: %s\n' "$*" >&2; exit 1; }
helper() { "$PY" "$HELPER" "$@"; }

usage() {
    cat <<EOF
Usage: $0 [options]

Installs the polar_cloud extra (README.md, "Install"): the Python requirements
into klippy's venv (Klipper's packages held; apt only for missing packages
Pillow may need), a link in <klipper>/klippy/extras, Moonraker's update entry
in <config>/$UM_FILE, pulled in by one line in moonraker.conf:
[include $UM_FILE]. Then restarts Klipper unless it prints.
Running it again repairs, changing nothing that is already right.

  -k, --klipper DIR        Klipper (or Kalico) checkout [~/klipper]
      --venv DIR           klippy's virtualenv [~/klippy-env]
  -d, --data DIR           printer data directory [~/printer_data]
  -c, --config DIR         its config directory (moonraker.conf) [<data>/config]
  -i, --instance NAME      one of several instances: ~/NAME_data (or
                           ~/printer_NAME_data, ~/printer_data_NAME), services
                           klipper-NAME and moonraker-NAME
  -a, --all                every instance: each ~/printer_data, ~/*_data,
                           ~/printer_data_* holding a config/ folder
  -s, --service NAME       Klipper's systemd unit [klipper]
      --moonraker-service NAME   Moonraker's unit [moonraker]
      --moonraker-url URL  Moonraker [http://127.0.0.1:<its [server] port>]
      --no-restart         do not restart Klipper/Moonraker
      --force-restart      restart even while printing/paused
      --nginx              serve the /polar-cloud/ page through nginx
                           (prints the snippet when nginx is not installed)
      --timelapse          install ffmpeg (apt), which makes the timelapses
                           of cloud prints; without it they are off
  -u, --uninstall          remove the link, the include line, $UM_FILE
                           and the nginx snippet; keeps pip packages and the
                           printer's identity (<data>/polar_cloud)
      --purge              with --uninstall: also delete the identity
      --allow-root         run as root (normally refused)
  -h, --help               this text

Several instances (~/printer_data, ~/printer_2_data, ...): pick one with -i,
-d or -c, or all with --all. printer.cfg is never edited. After a Moonraker
"recovery" of the Klipper repository, run this again.
EOF
}

# --- arguments -------------------------------------------------------------

KLIPPER_DIR=$HOME/klipper VENV_DIR=$HOME/klippy-env PICK=() ALL=0
NO_RESTART=0 FORCE_RESTART=0 NGINX=0 UNINSTALL=0 PURGE=0 ALLOW_ROOT=0
TIMELAPSE=0
while [ $# -gt 0 ]; do
    case $1 in --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;; esac
    case $1 in
        -k|--klipper|--venv|-d|--data|-c|--config|-i|--instance|-s|--service|\
        --moonraker-service|--moonraker-url)
            if [ $# -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value (see --help)"; fi
            case $1 in
                -k|--klipper) KLIPPER_DIR=$(realpath -ms -- "$2") ;;
                --venv) VENV_DIR=$(realpath -ms -- "$2") ;;
                *) PICK+=("$1" "$2") ;;   # which instances: install_helper.py instances
            esac
            shift ;;
        -a|--all) ALL=1 PICK+=(--all) ;;
        --no-restart) NO_RESTART=1 ;;
        --force-restart) FORCE_RESTART=1 ;;
        --nginx) NGINX=1 ;;
        --timelapse) TIMELAPSE=1 ;;
        -u|--uninstall) UNINSTALL=1 ;;
        --purge) PURGE=1 ;;
        --allow-root) ALLOW_ROOT=1 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
done
[ "$PURGE" = 0 ] || [ "$UNINSTALL" = 1 ] || die "--purge only goes with --uninstall"
[ "$TIMELAPSE" = 0 ] || [ "$UNINSTALL" = 0 ] || die "--timelapse does not go with --uninstall"
SUDO=(sudo)
if [ "$RUN_UID" = 0 ]; then
    [ "$ALLOW_ROOT" = 1 ] || die "do not run as root: run as the user Klipper runs as (sudo is used only for apt, restarts and nginx), or pass --allow-root"
    SUDO=()
fi

# --- where things are --------------------------------------------------------

VENV_PY=$VENV_DIR/bin/python
PY=$(command -v python3 || echo "$VENV_PY")   # runs the helper
EXTRAS_DIR=$KLIPPER_DIR/klippy/extras
ORIGIN=$(git -C "$REPO_DIR" remote get-url origin 2>/dev/null || true)
ORIGIN=${ORIGIN:-$DEFAULT_ORIGIN}
OUT=$(helper instances "${PICK[@]}") || exit 1
mapfile -t INSTANCES <<< "$OUT"
[ "$ALL" = 0 ] || say "instances: $(cut -d$'\x1f' -f1 <<< "$OUT" | tr '\n' ' ')"

use_instance() {  # RECORD: a line of `install_helper.py instances` (STATE_DIR is
    # empty for a state_path relative to klippy; CFGS: files with [polar_cloud])
    IFS=$'\x1f' read -r DATA_DIR CONFIG_DIR SERVICE MR_SERVICE MR_URL STATE_DIR CFGS <<< "$1"
    MR_CHANGED=0
}
use_instance "${INSTANCES[0]}"

for_each_instance() {  # FUNC: run it for each instance
    local rec
    for rec in "${INSTANCES[@]}"; do use_instance "$rec"; "$1"; done
}

# --- checks, before anything changes ------------------------------------------

check_install() {
    local ver
    [ -d "$KLIPPER_DIR" ] || die "Klipper not found at $KLIPPER_DIR (use -k DIR)"
    [ -d "$EXTRAS_DIR" ] || die "$KLIPPER_DIR is not a Klipper checkout: no klippy/extras folder (use -k DIR)"
    [ -d "$VENV_DIR" ] || die "klippy's virtualenv not found at $VENV_DIR (use --venv DIR)"
    [ -x "$VENV_PY" ] || die "$VENV_DIR has no bin/python: not a virtualenv (use --venv DIR)"
    ver=$("$VENV_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || die "cannot run $VENV_PY"
    case $ver in
        2.*) die "klippy's virtualenv runs Python $ver (Python 2): polar_cloud needs Python 3.9 or newer - rebuild klippy-env with Python 3 (KIAUH: remove and reinstall Klipper choosing Python 3)" ;;
        3.[0-8]) die "klippy's virtualenv runs Python $ver: polar_cloud needs Python 3.9 or newer" ;;
        3.*|[4-9].*) ;;
        *) die "cannot tell the Python version of $VENV_PY ('$ver')" ;;
    esac
    "$VENV_PY" -m pip --version >/dev/null 2>&1 || die "$VENV_DIR has no pip: run '$VENV_PY -m ensurepip' first"
    [ -f "$PKG_DIR/__init__.py" ] || die "$PKG_DIR/__init__.py missing: run install.sh from a complete clone of polar_cloud"
    git -C "$REPO_DIR" rev-parse --git-dir >/dev/null 2>&1 \
        || warn "$REPO_DIR is not a git clone: Moonraker cannot update it (clone it with git instead)"
    helper link-check "$KLIPPER_DIR" || exit 1
}

check_purge() {  # refuse to delete a state_path that holds more than the identity
    local p
    [ "$PURGE" = 1 ] && [ -n "$STATE_DIR" ] && [ -d "$STATE_DIR" ] || return 0
    for p in "$HOME" "$DATA_DIR" "$CONFIG_DIR" "$REPO_DIR" "$KLIPPER_DIR" "$VENV_DIR"; do
        case $(realpath -m "$p")/ in "$(realpath -m "$STATE_DIR")"/*)
            die "--purge: $STATE_DIR holds $p, not deleting it (check state_path)" ;;
        esac
    done
    [ ! -e "$STATE_DIR/.git" ] || die "--purge: $STATE_DIR is a git checkout, not an identity folder"
}

# --- steps --------------------------------------------------------------------

install_system_packages() {  # those of PKGLIST that are missing, with apt
    local p missing=()
    command -v dpkg-query >/dev/null 2>&1 || { say "no dpkg here: if pip has to build Pillow, install its build dependencies ($PKGLIST) yourself"; return 0; }
    for p in $PKGLIST; do
        [ "$p" != ffmpeg ] || continue      # offered, never forced
        # shellcheck disable=SC2016  # dpkg's format, not the shell's
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q ' installed$' || missing+=("$p")
    done
    [ ${#missing[@]} -gt 0 ] || return 0
    say "installing ${missing[*]} (for pip to build Pillow where it finds no wheel)"
    if ! { "${SUDO[@]}" apt-get update -qq && "${SUDO[@]}" apt-get install -y -qq "${missing[@]}"; }; then
        warn "could not install ${missing[*]}: pip needs them only where it finds no wheel"
    fi
}

install_ffmpeg() {  # timelapses: offered, never forced
    if command -v "$FFMPEG" >/dev/null 2>&1; then
        say "ffmpeg found: timelapses of cloud prints are on (option timelapse)"
    elif [ "$TIMELAPSE" = 0 ]; then
        say "ffmpeg not installed: no timelapses of cloud prints (run again with --timelapse to install it, or: sudo apt install ffmpeg)"
    elif ! command -v apt-get >/dev/null 2>&1; then
        warn "--timelapse: no apt-get here: install ffmpeg yourself"
    elif "${SUDO[@]}" apt-get install -y ffmpeg; then
        say "ffmpeg installed: timelapses of cloud prints are on"
    else
        warn "could not install ffmpeg (try: sudo apt-get update, then run again); timelapses stay off"
    fi
}

update_manager() {  # install|remove: $UM_FILE and its include in moonraker.conf
    local rc=0
    helper update-manager "$1" "$CONFIG_DIR" --path "$REPO_DIR" --origin "$ORIGIN" --venv "$VENV_DIR" || rc=$?
    case $rc in 0) ;; 10) MR_CHANGED=1 ;; *) die "could not edit $CONFIG_DIR/moonraker.conf" ;; esac
}

restart_services() {  # REASON_TO_HOLD: non-empty holds the restart
    local args=(--hold "$1")
    [ "$NO_RESTART" = 0 ] || args+=(--no-restart)
    [ "$FORCE_RESTART" = 0 ] || args+=(--force)
    [ ${#SUDO[@]} = 0 ] || args+=(--sudo)
    args+=("$MR_URL" "$SERVICE")
    [ "$MR_CHANGED" = 0 ] || args+=("$MR_SERVICE")   # after Klipper
    helper restart "${args[@]}"
}

install_instance() {  # what each instance gets: the include, a restart
    say "config: $CONFIG_DIR"
    update_manager install
    restart_services ""
    if [ -n "$CFGS" ]; then
        say "[polar_cloud] found in: $CFGS"
    else
        say "next: add this section to printer.cfg, then RESTART Klipper (all options: $REPO_DIR/printer_cfg_example):"
        printf '\n[polar_cloud]\n\n'
    fi
    say "then register the printer from the shell: $REPO_DIR/scripts/register.sh --email you@example.com (it asks for the PIN and keeps it out of logs; --all for every instance), or from the console: POLAR_REGISTER EMAIL=you@example.com PIN=1234"
    say "its identity is kept in ${STATE_DIR:-state_path (relative to klippy)}"
}

uninstall_instance() {
    update_manager remove
    restart_services "${CFGS:+[polar_cloud] is still in $CFGS - remove it first or Klipper will not start}"
    if [ -z "$STATE_DIR" ]; then
        say "state_path in [polar_cloud] is relative: delete the identity yourself if you want to"
    elif [ -d "$STATE_DIR" ] && [ "$PURGE" = 1 ]; then
        rm -rf "$STATE_DIR"
        say "deleted the printer's identity $STATE_DIR (--purge)"
    elif [ -d "$STATE_DIR" ]; then
        say "kept: the printer's identity in $STATE_DIR (--purge deletes it)"
    fi
}

do_install() {
    check_install
    say "Klipper: $KLIPPER_DIR, venv: $VENV_DIR"
    [ ! -d "$KLIPPER_DIR/klippy/plugins" ] || say "Kalico detected: linking into klippy/extras, which Kalico loads too"
    install_system_packages
    install_ffmpeg
    "$VENV_PY" "$HELPER" pip-install --hold-file "$KLIPPER_DIR/scripts/klippy-requirements.txt" \
        -r "$REPO_DIR/requirements.txt" || exit 1
    "$VENV_PY" "$HELPER" imports || exit 1
    helper link "$KLIPPER_DIR" "$PKG_DIR"
    [ "$NGINX" = 0 ] || bash "$REPO_DIR/scripts/install_nginx.sh" install
    for_each_instance install_instance
}

do_uninstall() {
    local others=""
    for_each_instance check_purge
    [ "$ALL" = 1 ] || others=$(helper installed-elsewhere "$DATA_DIR")
    if [ ! -d "$EXTRAS_DIR" ]; then
        say "no Klipper at $KLIPPER_DIR: nothing to unlink"
    elif [ -n "$others" ]; then
        say "link $EXTRAS_DIR/polar_cloud kept: still used by $others (uninstall those instances first)"
    else
        helper unlink "$KLIPPER_DIR"
    fi
    bash "$REPO_DIR/scripts/install_nginx.sh" remove
    for_each_instance uninstall_instance
    say "kept: pip packages in $VENV_DIR (other extras may use them)"
    say "kept: this repository ($REPO_DIR) and any moonraker.conf backups"
}

if [ "$UNINSTALL" = 1 ]; then do_uninstall; else do_install; fi
