#!/bin/bash
# Install, repair or remove the polar_cloud Klipper extra (Polar Cloud).
#
# Run as the user Klipper runs as, from a git clone of this repository:
#   ./install.sh            install or repair (safe to run again)
#   ./install.sh -u         uninstall (keeps the printer's identity)
# ./install.sh -h lists every option. Nothing is asked: flags only.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
set -euo pipefail
export LC_ALL=C

# System packages (read by KIAUH and Moonraker; keep system-dependencies.json
# in step). pip installs every Python requirement as a wheel on
# x86_64/aarch64; ffmpeg makes the timelapses of cloud prints, and is
# optional: Moonraker installs it on update, install.sh only when asked
# (--timelapse).
# shellcheck disable=SC2034  # read by other tools, not here
PKGLIST="ffmpeg"

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
PKG_DIR=$REPO_DIR/klippy_extras/polar_cloud
DEFAULT_ORIGIN=https://github.com/polar-cloud-klipper/polar_cloud
UM_HEADER="[update_manager polar_cloud]"
UM_MARK="# polar_cloud: added by install.sh"
EXCLUDE_LINE=/klippy/extras/polar_cloud
MIN_PY_MINOR=9      # Python 3.9
# Test hooks, not for normal use: stand-ins for `id -u`, systemd's
# /run/systemd/system, /etc/nginx and the ffmpeg command.
RUN_UID=${POLAR_INSTALL_UID:-$(id -u)}
FFMPEG=${POLAR_FFMPEG:-ffmpeg}
SYSTEMD_DIR=${POLAR_SYSTEMD_DIR:-/run/systemd/system}
NGINX_DIR=${POLAR_NGINX_DIR:-/etc/nginx}

say()  { printf 'polar_cloud: %s\n' "$*"; }
warn() { printf 'polar_cloud: WARNING: %s\n' "$*" >&2; }
die()  { printf 'polar_cloud: ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
    cat <<EOF
Usage: $0 [options]

Installs the polar_cloud extra: its Python requirements into klippy's
virtualenv (Klipper's own packages are held at their installed versions),
a link <klipper>/klippy/extras/polar_cloud -> klippy_extras/polar_cloud of
this repository, an [update_manager polar_cloud] section in moonraker.conf
(backed up first); then restarts Klipper unless a print is running.
Running it again repairs, and changes nothing that is already right.

Paths (defaults in brackets):
  -k, --klipper DIR        Klipper (or Kalico) checkout [~/klipper]
      --venv DIR           klippy's virtualenv [~/klippy-env]
  -d, --data DIR           printer data directory [~/printer_data]
  -c, --config DIR         config directory holding moonraker.conf
                           [<data>/config]; the data directory is its parent
  -i, --instance NAME      multi-instance setup: use ~/NAME_data (or
                           ~/printer_NAME_data, ~/printer_data_NAME), services
                           klipper-NAME and moonraker-NAME
  -s, --service NAME       Klipper's systemd unit [klipper]
      --moonraker-service NAME   Moonraker's unit [moonraker]
      --moonraker-url URL  where to ask whether a print is running
                           [http://127.0.0.1:<[server] port or 7125>]
Actions:
      --no-restart         do not restart Klipper/Moonraker
      --force-restart      restart even while printing/paused
      --nginx              serve the web/ page at /polar-cloud/ through nginx
                           (prints the snippet when nginx is not installed)
      --timelapse          install ffmpeg (apt), which makes the timelapses
                           of cloud prints; without it they are off
  -u, --uninstall          remove link, exclude entry, update_manager section
                           and nginx snippet; keeps pip packages and the
                           identity in <data>/polar_cloud
      --purge              with --uninstall: also delete the identity (the
                           printer then registers as a new printer)
      --allow-root         run as root (normally refused)
  -h, --help               this text

With several printer data directories (~/printer_data, ~/*_data) and none
chosen, nothing is done: run once per instance with --instance or -d.
After a Moonraker "recovery" of the Klipper repository, run this again.
EOF
}

# --- arguments -------------------------------------------------------------

KLIPPER_DIR="" VENV_DIR="" DATA_DIR="" CONFIG_DIR="" INSTANCE=""
SERVICE="" MR_SERVICE="" MR_URL=""
NO_RESTART=0 FORCE_RESTART=0 NGINX=0 UNINSTALL=0 PURGE=0 ALLOW_ROOT=0
TIMELAPSE=0

abspath() {  # absolute form of a path, without trailing slashes
    local p=$1
    case $p in /*) ;; *) p=$PWD/$p ;; esac
    while [ "${p%/}" != "$p" ] && [ "$p" != / ]; do p=${p%/}; done
    printf '%s\n' "$p"
}

while [ $# -gt 0 ]; do
    case $1 in
        --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
    esac
    case $1 in
        -k|--klipper|--venv|-d|--data|-c|--config|-i|--instance|-s|--service|\
        --moonraker-service|--moonraker-url)
            if [ $# -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value (see --help)"; fi ;;
    esac
    case $1 in
        -k|--klipper) KLIPPER_DIR=$(abspath "$2"); shift ;;
        --venv) VENV_DIR=$(abspath "$2"); shift ;;
        -d|--data) DATA_DIR=$(abspath "$2"); shift ;;
        -c|--config) CONFIG_DIR=$(abspath "$2"); shift ;;
        -i|--instance) INSTANCE=$2; shift ;;
        -s|--service) SERVICE=$2; shift ;;
        --moonraker-service) MR_SERVICE=$2; shift ;;
        --moonraker-url) MR_URL=${2%/}; shift ;;
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

if [ "$RUN_UID" = 0 ]; then
    [ "$ALLOW_ROOT" = 1 ] || die "do not run as root: run as the user Klipper runs as (sudo is used only for restarts and nginx), or pass --allow-root"
    SUDO=()
else
    SUDO=(sudo)
fi

# --- locations -------------------------------------------------------------

list_data_dirs() {  # one printer data directory per instance, under $HOME
    local d
    for d in "$HOME"/*_data "$HOME"/printer_data_*; do
        [ -d "$d/config" ] && printf '%s\n' "$d"
    done | sort -u
}

resolve_data_dir() {
    local d found=()
    if [ -n "$CONFIG_DIR" ]; then
        # The module keeps its state beside the config folder, so the data
        # directory is always the config folder's parent.
        DATA_DIR=${DATA_DIR:-$(dirname "$CONFIG_DIR")}
    elif [ -z "$DATA_DIR" ] && [ -n "$INSTANCE" ]; then
        for d in "$HOME/${INSTANCE}_data" "$HOME/printer_${INSTANCE}_data" \
                 "$HOME/printer_data_${INSTANCE}"; do
            if [ -d "$d/config" ]; then DATA_DIR=$d; break; fi
        done
        [ -n "$DATA_DIR" ] || die "instance '$INSTANCE': none of ~/${INSTANCE}_data, ~/printer_${INSTANCE}_data, ~/printer_data_${INSTANCE} has a config/ folder (found: $(list_data_dirs | tr '\n' ' '))"
    elif [ -z "$DATA_DIR" ]; then
        mapfile -t found < <(list_data_dirs)
        case ${#found[@]} in
            0) die "no printer data directory found (~/printer_data/config): pass -d DIR or -c DIR" ;;
            1) DATA_DIR=${found[0]} ;;
            *) die "several printer data directories: ${found[*]} - pick one with --instance NAME or -d DIR (run once per instance)" ;;
        esac
    fi
    [ -d "$DATA_DIR" ] || die "printer data directory $DATA_DIR does not exist (use -d DIR)"
    CONFIG_DIR=${CONFIG_DIR:-$DATA_DIR/config}
    MR_CONF=$CONFIG_DIR/moonraker.conf
}

cfg_files() {  # Klipper config files that may hold [polar_cloud]
    [ -d "$CONFIG_DIR" ] || return 0
    grep -rlsE '^[[:space:]]*\[polar_cloud\]' --include='*.cfg' \
        --exclude='printer-[0-9]*.cfg' "$CONFIG_DIR" || true
}

resolve_state_dir() {  # as the module does: state_path, else beside config/
    local f sp=""
    while IFS= read -r f; do
        sp=$(awk '/^[[:space:]]*\[/ { s = ($0 ~ /^[[:space:]]*\[polar_cloud\]/) }
                  s && /^[[:space:]]*state_path[[:space:]]*[:=]/ {
                      sub(/^[^:=]*[:=][[:space:]]*/, ""); sub(/[[:space:]]+[#;].*$/, "")
                      sub(/[[:space:]]+$/, ""); print; exit }' "$f")
        [ -z "$sp" ] || break
    done < <(cfg_files)
    case $sp in
        "") if [ "$(basename "$CONFIG_DIR")" = config ]; then
                STATE_DIR=$(dirname "$CONFIG_DIR")/polar_cloud
            else  # legacy ~/klipper_config: the module uses a hidden name
                STATE_DIR=$(dirname "$CONFIG_DIR")/.polar_cloud
            fi ;;
        \~|\~/*) STATE_DIR=$(abspath "$HOME${sp#\~}") ;;
        /*) STATE_DIR=$(abspath "$sp") ;;
        *) STATE_DIR="" ;;   # relative to klippy's working directory: unknown
    esac
}

resolve_paths() {
    KLIPPER_DIR=${KLIPPER_DIR:-$HOME/klipper}
    VENV_DIR=${VENV_DIR:-$HOME/klippy-env}
    VENV_PY=$VENV_DIR/bin/python
    resolve_data_dir
    resolve_state_dir
    if [ -n "$INSTANCE" ]; then
        SERVICE=${SERVICE:-klipper-$INSTANCE}
        MR_SERVICE=${MR_SERVICE:-moonraker-$INSTANCE}
    fi
    SERVICE=${SERVICE:-klipper}
    MR_SERVICE=${MR_SERVICE:-moonraker}
    EXTRAS_DIR=$KLIPPER_DIR/klippy/extras
    LINK=$EXTRAS_DIR/polar_cloud
    ORIGIN=$(git -C "$REPO_DIR" remote get-url origin 2>/dev/null || true)
    ORIGIN=${ORIGIN:-$DEFAULT_ORIGIN}
    if [ -z "$MR_URL" ]; then
        local port=""
        [ -f "$MR_CONF" ] && port=$(awk -F'[:=]' '
            /^[[:space:]]*\[/ { s = ($0 ~ /^[[:space:]]*\[server\]/) }
            s && $1 ~ /^[[:space:]]*port[[:space:]]*$/ { gsub(/[^0-9]/, "", $2); print $2; exit }' "$MR_CONF")
        MR_URL=http://127.0.0.1:${port:-7125}
    fi
}

check_klipper() {
    [ -d "$KLIPPER_DIR" ] || die "Klipper not found at $KLIPPER_DIR (use -k DIR)"
    [ -d "$EXTRAS_DIR" ] || die "$KLIPPER_DIR is not a Klipper checkout: no klippy/extras folder (use -k DIR)"
}

check_venv() {
    local ver major minor
    [ -d "$VENV_DIR" ] || die "klippy's virtualenv not found at $VENV_DIR (use --venv DIR)"
    [ -x "$VENV_PY" ] || die "$VENV_DIR has no bin/python: not a virtualenv (use --venv DIR)"
    ver=$("$VENV_PY" -c 'import sys; print("%d.%d" % tuple(sys.version_info[:2]))' 2>/dev/null) \
        || die "cannot run $VENV_PY"
    major=${ver%%.*} minor=${ver#*.}
    case $major$minor in *[!0-9]*|"") die "cannot tell the Python version of $VENV_PY ('$ver')" ;; esac
    [ "$major" -ge 3 ] || die "klippy's virtualenv runs Python $ver (Python 2): polar_cloud needs Python 3.$MIN_PY_MINOR or newer - rebuild klippy-env with Python 3 (KIAUH: remove and reinstall Klipper choosing Python 3)"
    [ "$major" -gt 3 ] || [ "$minor" -ge "$MIN_PY_MINOR" ] \
        || die "klippy's virtualenv runs Python $ver: polar_cloud needs Python 3.$MIN_PY_MINOR or newer"
    "$VENV_PY" -m pip --version >/dev/null 2>&1 \
        || die "$VENV_DIR has no pip: run '$VENV_PY -m ensurepip' first"
}

check_repo() {
    [ -f "$PKG_DIR/__init__.py" ] || die "$PKG_DIR/__init__.py missing: run install.sh from a complete clone of polar_cloud"
    git -C "$REPO_DIR" rev-parse --git-dir >/dev/null 2>&1 \
        || warn "$REPO_DIR is not a git clone: Moonraker cannot update it (clone it with git instead)"
    case ${STATE_DIR:-/}/ in "$REPO_DIR"/*)
        warn "the identity would be stored in the repository ($STATE_DIR): set state_path in [polar_cloud]" ;;
    esac
}

check_link_target() {  # refuse before changing anything when the link place is taken
    local p
    if [ -e "$LINK" ] && [ ! -L "$LINK" ]; then
        die "$LINK exists and is not a link (an old copy?): move it away and run again"
    fi
    [ ! -e "$EXTRAS_DIR/polar_cloud.py" ] \
        || die "$EXTRAS_DIR/polar_cloud.py exists (another polar_cloud module): remove it and run again"
    # Kalico loads klippy/extras and klippy/plugins and refuses a module
    # found in both.
    for p in "$KLIPPER_DIR/klippy/plugins/polar_cloud" "$KLIPPER_DIR/klippy/plugins/polar_cloud.py"; do
        if [ -e "$p" ] && [ ! -L "$p" ]; then
            die "$p exists: Kalico would load polar_cloud twice; remove it and run again"
        fi
    done
}

# --- python helpers ---------------------------------------------------------

klipper_pins() {  # [constraints]: Klipper's own packages, as name==version
    # Installed ones at their installed version. With "constraints", also the
    # lines of klippy-requirements.txt for those not installed, so that pip
    # picks Klipper's version if our requirements need one of them.
    local reqs=$KLIPPER_DIR/scripts/klippy-requirements.txt
    [ -f "$reqs" ] || reqs=""
    "$VENV_PY" - "$reqs" "${1:-}" <<'PY'
import re, sys
from importlib import metadata
reqs, mode = sys.argv[1:3]
lines = ["cffi", "pyserial", "greenlet", "Jinja2", "python-can", "markupsafe"]
if reqs:
    with open(reqs, encoding="utf-8", errors="replace") as f:
        lines = [l.split("#", 1)[0].strip() for l in f]
done = set()
for line in lines:
    m = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
    if not m:
        continue
    name = m.group(0)
    key = re.sub(r"[-_.]+", "-", name).lower()
    try:
        if key not in done:
            print("%s==%s" % (name, metadata.version(name)))
        done.add(key)
    except metadata.PackageNotFoundError:
        if mode == "constraints" and re.search(r"[=<>~!]", line):
            print(line)
PY
}

conf_edit() {  # MODE FILE [BLOCKFILE]: new text of FILE on stdout
    # install: replace our section in place, or append it; exit 3 when a
    # section of that name not written by us exists (left alone).
    # remove: drop the section (ours or not) with its marker line.
    "$PY" - "$UM_HEADER" "$UM_MARK" "$@" <<'PY'
import sys
header, mark, mode, path = sys.argv[1:5]
with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
    text = f.read()
block = ""
if mode == "install":
    with open(sys.argv[5], encoding="utf-8", newline="") as f:
        block = f.read()
lines = text.splitlines(True)
start = next((i for i, l in enumerate(lines) if " ".join(l.split()) == header), None)
if start is None:
    if mode == "install":
        if text and not text.endswith("\n"):
            text += "\n"
        text += ("\n" if text.strip() else "") + block
else:
    end = start + 1
    while end < len(lines) and not lines[end].lstrip().startswith("["):
        end += 1
    # Trailing blank and comment lines belong to what follows.
    while end > start + 1 and (not lines[end - 1].strip()
                               or lines[end - 1].lstrip()[:1] in "#;"):
        end -= 1
    ours = start > 0 and lines[start - 1].startswith(mark)
    if ours:
        start -= 1
    if mode == "install":
        if not ours:
            sys.exit(3)
    elif start > 0 and not lines[start - 1].strip():
        start -= 1
    text = "".join(lines[:start]) + block + "".join(lines[end:])
sys.stdout.buffer.write(text.encode("utf-8", "surrogateescape"))
PY
}

print_state() {  # Klipper's print_stats.state as Moonraker reports it
    "$PY" - "$MR_URL/printer/objects/query?print_stats" <<'PY' 2>/dev/null || echo unknown
import json, sys, urllib.error, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(sys.argv[1], timeout=3) as r:
        status = json.loads(r.read().decode("utf-8"))["result"]["status"]
    print(status.get("print_stats", {}).get("state") or "notready")
except urllib.error.HTTPError as e:
    print("denied" if e.code in (401, 403) else "notready")
except (urllib.error.URLError, OSError):
    print("unreachable")
except Exception:
    print("unknown")
PY
}

# --- file edits ---------------------------------------------------------------

TMP_DIR=$(mktemp -d)
trap 'rm -rf "$TMP_DIR"' EXIT

backup() {  # FILE [sudo...]: timestamped copy beside FILE; echoes its name
    local f=$1 base b n=1
    base=$f.polar_cloud-$(date +%Y%m%d-%H%M%S)
    b=$base.bak
    while [ -e "$b" ]; do b=$base-$n.bak; n=$((n + 1)); done
    "${@:2}" cp -p "$f" "$b"
    printf '%s\n' "$b"
}

replace_if_changed() {  # FILE NEW [sudo...]: 0 when FILE was rewritten
    local f=$1 new=$2 b
    if cmp -s "$new" "$f"; then return 1; fi
    b=$(backup "$f" "${@:3}")
    "${@:3}" cp "$new" "$f"    # cp keeps the file's owner, mode and links
    say "updated $f (backup: $b)"
}

um_block() {
    # "klipper" is a service Moonraker may always restart: moonraker.asvc
    # needs no entry.
    cat <<EOF
$UM_MARK; \`install.sh --uninstall\` removes it
$UM_HEADER
type: git_repo
path: $REPO_DIR
origin: $ORIGIN
primary_branch: main
virtualenv: $VENV_DIR
requirements: requirements.txt
system_dependencies: system-dependencies.json
managed_services: klipper
EOF
}

MR_CHANGED=0

um_elsewhere() {  # other Moonraker config files holding our section
    [ -d "$CONFIG_DIR" ] || return 0
    grep -rlsF --include='*.conf' "$UM_HEADER" "$CONFIG_DIR" | grep -vxF "$MR_CONF" || true
}

add_update_manager() {
    local rc=0 elsewhere
    if [ ! -f "$MR_CONF" ]; then
        warn "$MR_CONF not found: add this section to your moonraker.conf for updates:"
        um_block
        return 0
    fi
    elsewhere=$(um_elsewhere)
    if [ -n "$elsewhere" ]; then
        say "$UM_HEADER is already in $elsewhere: moonraker.conf left unchanged"
        return 0
    fi
    um_block > "$TMP_DIR/block"
    conf_edit install "$MR_CONF" "$TMP_DIR/block" > "$TMP_DIR/mr.conf" || rc=$?
    case $rc in
        0) if replace_if_changed "$MR_CONF" "$TMP_DIR/mr.conf"; then MR_CHANGED=1
           else say "moonraker.conf already has the update_manager section"; fi ;;
        3) say "moonraker.conf has its own $UM_HEADER section: left unchanged" ;;
        *) die "could not edit $MR_CONF" ;;
    esac
}

remove_update_manager() {
    local elsewhere
    if [ -f "$MR_CONF" ]; then
        conf_edit remove "$MR_CONF" > "$TMP_DIR/mr.conf" || die "could not edit $MR_CONF"
        if replace_if_changed "$MR_CONF" "$TMP_DIR/mr.conf"; then MR_CHANGED=1; fi
    fi
    elsewhere=$(um_elsewhere)
    [ -z "$elsewhere" ] || warn "$UM_HEADER is still in $elsewhere: remove it by hand"
}

add_exclude() {
    local ex=$KLIPPER_DIR/.git/info/exclude
    [ -d "$KLIPPER_DIR/.git/info" ] || return 0
    if grep -qxF "$EXCLUDE_LINE" "$ex" 2>/dev/null; then return 0; fi
    if [ -s "$ex" ] && [ -n "$(tail -c1 "$ex")" ]; then echo >> "$ex"; fi
    printf '%s\n' "$EXCLUDE_LINE" >> "$ex"
    say "added $EXCLUDE_LINE to $ex"
}

remove_exclude() {
    local ex=$KLIPPER_DIR/.git/info/exclude
    [ -f "$ex" ] && grep -qxF "$EXCLUDE_LINE" "$ex" || return 0
    grep -vxF "$EXCLUDE_LINE" "$ex" > "$TMP_DIR/exclude" || true
    cat "$TMP_DIR/exclude" > "$ex"
    say "removed $EXCLUDE_LINE from $ex"
}

# --- steps --------------------------------------------------------------------

install_requirements() {
    local pipver
    pipver=$("$VENV_PY" -m pip --version | awk '{print $2}')
    case $pipver in
        [0-9].*|1[0-9].*|20.[0-2]*)   # too old for current manylinux wheels
            say "upgrading pip $pipver in $VENV_DIR"
            "$VENV_PY" -m pip install -q --disable-pip-version-check "pip>=20.3" \
                || die "could not upgrade pip in $VENV_DIR" ;;
    esac
    local changed held
    klipper_pins > "$TMP_DIR/pins.txt"
    klipper_pins constraints > "$TMP_DIR/constraints.txt"
    held=$(tr '\n' ' ' < "$TMP_DIR/pins.txt")
    say "installing requirements into $VENV_DIR, holding Klipper's packages: ${held:-none installed, using the versions Klipper lists}"
    "$VENV_PY" -m pip install -q --disable-pip-version-check \
        -c "$TMP_DIR/constraints.txt" -r "$REPO_DIR/requirements.txt" \
        || die "pip could not install requirements.txt into $VENV_DIR without changing Klipper's packages (see pip's message above)"
    klipper_pins > "$TMP_DIR/pins-after.txt"
    changed=$(grep -vxF -f "$TMP_DIR/pins-after.txt" "$TMP_DIR/pins.txt" || true)
    [ -z "$changed" ] || die "pip changed Klipper's packages, they were: $(echo "$changed" | tr '\n' ' ')"
    # Import names of requirements.txt.
    "$VENV_PY" -c 'import socketio, engineio, websocket, requests, PIL.Image
import cryptography.hazmat.primitives.asymmetric.rsa' \
        || die "the requirements do not import in $VENV_DIR (on 32-bit Raspberry Pi OS, piwheels' Pillow needs e.g. libopenjp2-7 libjpeg62-turbo libtiff6); Klipper not linked"
}

link_module() {
    local p cur
    for p in "$KLIPPER_DIR/klippy/plugins/polar_cloud" "$KLIPPER_DIR/klippy/plugins/polar_cloud.py"; do
        if [ -L "$p" ]; then rm -f "$p"; say "removed $p (Kalico loads klippy/extras too)"; fi
    done
    if [ -L "$LINK" ] && [ "$(readlink "$LINK")" = "$PKG_DIR" ]; then
        say "link $LINK -> $PKG_DIR already in place"
    else
        if [ -L "$LINK" ]; then cur=$(readlink "$LINK"); say "replacing link $LINK (was -> $cur)"; fi
        ln -sfn "$PKG_DIR" "$LINK"
        say "linked $LINK -> $PKG_DIR"
    fi
    add_exclude
}

install_ffmpeg() {  # timelapses: offered, never forced
    if command -v "$FFMPEG" >/dev/null 2>&1; then
        say "ffmpeg found: timelapses of cloud prints are on (option timelapse)"
        return 0
    fi
    if [ "$TIMELAPSE" = 0 ]; then
        say "ffmpeg not installed: no timelapses of cloud prints (run again with --timelapse to install it, or: sudo apt install ffmpeg)"
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 \
        || { warn "--timelapse: no apt-get here: install ffmpeg yourself"; return 0; }
    say "installing ffmpeg (--timelapse)"
    if "${SUDO[@]}" apt-get install -y ffmpeg; then
        say "ffmpeg installed: timelapses of cloud prints are on"
    else
        warn "could not install ffmpeg (try: sudo apt-get update, then run again); timelapses stay off"
    fi
}

nginx_bin() {
    command -v nginx 2>/dev/null && return 0
    if [ -x /usr/sbin/nginx ]; then echo /usr/sbin/nginx; fi
}

nginx_sites() {  # web UI sites we may add our include to
    local s
    for s in mainsail fluidd; do
        [ -f "$NGINX_DIR/sites-available/$s" ] && printf '%s\n' "$NGINX_DIR/sites-available/$s"
    done
    return 0
}

nginx_check_reload() {  # BIN: test the config, reload; 1 when nginx rejects it
    if ! "${SUDO[@]}" "$1" -t >/dev/null 2>&1; then return 1; fi
    if have_systemd; then "${SUDO[@]}" systemctl reload nginx || warn "could not reload nginx"
    else say "reload nginx yourself to serve /polar-cloud/"; fi
}

install_nginx() {
    local bin snippet=$NGINX_DIR/snippets/polar_cloud.conf site inc p sites=() backups=()
    [ "$NGINX" = 1 ] || return 0
    if [ ! -d "$REPO_DIR/web" ]; then
        say "--nginx: $REPO_DIR/web does not exist in this version: skipped"
        return 0
    fi
    cat > "$TMP_DIR/nginx.conf" <<EOF
# polar_cloud: added by install.sh --nginx; install.sh --uninstall removes it
location = /polar-cloud {
    return 301 /polar-cloud/;
}
location /polar-cloud/ {
    alias "$REPO_DIR/web/";
    index index.html;
}
EOF
    bin=$(nginx_bin || true)
    if [ -z "$bin" ] || [ ! -d "$NGINX_DIR" ]; then
        say "nginx not installed: put this in your web server's server { } block:"
        cat "$TMP_DIR/nginx.conf"
        return 0
    fi
    mapfile -t sites < <(nginx_sites)
    inc="include \"$snippet\";"
    if ! cmp -s "$TMP_DIR/nginx.conf" "$snippet"; then
        "${SUDO[@]}" mkdir -p "$NGINX_DIR/snippets"
        "${SUDO[@]}" cp "$TMP_DIR/nginx.conf" "$snippet"
        "${SUDO[@]}" chmod 644 "$snippet"
        say "wrote $snippet"
    fi
    for site in "${sites[@]}"; do
        grep -qF "$inc" "$site" && continue
        INC=$inc awk '!done && /^[[:space:]]*server_name[[:space:]]/ { print; print "    " ENVIRON["INC"]; done = 1; next }
                      { print } END { exit !done }' "$site" > "$TMP_DIR/site" \
            || { warn "no server_name line in $site: add '$inc' to its server block yourself"; continue; }
        backups+=("$site" "$(backup "$site" "${SUDO[@]}")")
        "${SUDO[@]}" cp "$TMP_DIR/site" "$site"
        say "added the snippet to $site"
    done
    [ ${#sites[@]} -gt 0 ] || say "no mainsail/fluidd site in $NGINX_DIR/sites-available: add '$inc' to your server block"
    if ! nginx_check_reload "$bin"; then
        set -- "${backups[@]}"
        while [ $# -gt 0 ]; do "${SUDO[@]}" cp "$2" "$1"; shift 2; done
        "${SUDO[@]}" rm -f "$snippet"
        warn "nginx rejected the configuration: changes undone (/polar-cloud/ not served)"
        return 0
    fi
    # nginx (www-data) must be able to walk down to web/.
    p=$REPO_DIR/web
    while [ "$p" != / ]; do
        if (( (8#$(stat -c %a "$p") & 1) == 0 )); then
            warn "$p is not readable by nginx (chmod o+x $p) - /polar-cloud/ may answer 403"
            break
        fi
        p=$(dirname "$p")
    done
}

remove_nginx() {
    local snippet=$NGINX_DIR/snippets/polar_cloud.conf site bin inc changed=0
    inc="include \"$snippet\";"
    while IFS= read -r site; do
        grep -qF "$inc" "$site" || continue
        INC=$inc awk '{ line = $0; gsub(/^[[:space:]]+|[[:space:]]+$/, "", line) }
                      line != ENVIRON["INC"]' "$site" > "$TMP_DIR/site"
        replace_if_changed "$site" "$TMP_DIR/site" "${SUDO[@]}" || true
        changed=1
    done < <(nginx_sites)
    if [ -f "$snippet" ]; then "${SUDO[@]}" rm -f "$snippet"; say "removed $snippet"; changed=1; fi
    bin=$(nginx_bin || true)
    if [ "$changed" = 1 ] && [ -n "$bin" ]; then
        nginx_check_reload "$bin" || warn "nginx rejects its configuration now: check with 'sudo nginx -t'"
    fi
}

have_systemd() {
    command -v systemctl >/dev/null 2>&1 && [ -d "$SYSTEMD_DIR" ]
}

restart_services() {  # REASON_TO_HOLD: non-empty skips the restart
    local hold=$1 state user
    if [ -n "$hold" ]; then
        warn "$hold"
        if [ "$FORCE_RESTART" = 0 ]; then
            say "not restarting $SERVICE (--force-restart overrides)"
            return 0
        fi
    fi
    if [ "$NO_RESTART" = 1 ]; then
        say "not restarting (--no-restart): restart Klipper to load the change (sudo systemctl restart $SERVICE)"
        return 0
    fi
    if ! have_systemd; then
        say "no systemd here (container?): restart Klipper yourself to load the change"
        return 0
    fi
    if ! systemctl cat "$SERVICE.service" >/dev/null 2>&1; then
        warn "no systemd unit $SERVICE.service: restart Klipper yourself (or pass -s NAME)"
        return 0
    fi
    user=$(systemctl show -p User --value "$SERVICE.service" 2>/dev/null || true)
    if [ -n "$user" ] && [ "$user" != "$(id -un)" ]; then
        warn "$SERVICE runs as '$user', not as you ($(id -un)): run install.sh as '$user'"
    fi
    state=$(print_state)
    case $state in
        printing|paused)
            if [ "$FORCE_RESTART" = 0 ]; then
                warn "Klipper is $state: not restarting now; after the print run: sudo systemctl restart $SERVICE"
                return 0
            fi ;;
        denied|unknown)
            if [ "$FORCE_RESTART" = 0 ]; then
                warn "Moonraker at $MR_URL did not say whether a print is running ($state): not restarting; use --force-restart or restart $SERVICE after the print"
                return 0
            fi ;;
        unreachable) say "Moonraker not reachable at $MR_URL: assuming no print is running" ;;
    esac
    say "restarting $SERVICE"
    "${SUDO[@]}" systemctl restart "$SERVICE" || die "could not restart $SERVICE"
    if [ "$MR_CHANGED" = 1 ]; then
        if systemctl cat "$MR_SERVICE.service" >/dev/null 2>&1; then
            say "restarting $MR_SERVICE (moonraker.conf changed)"
            "${SUDO[@]}" systemctl restart "$MR_SERVICE" || warn "could not restart $MR_SERVICE"
        else
            say "restart Moonraker yourself to load the moonraker.conf change (no unit $MR_SERVICE.service)"
        fi
    fi
}

other_instances() {  # other data dirs whose moonraker.conf still has our section
    local d
    while IFS= read -r d; do
        [ "$d" = "$DATA_DIR" ] && continue
        grep -qsF "$UM_HEADER" "$d/config/moonraker.conf" && printf '%s ' "$d"
    done < <(list_data_dirs)
    return 0
}

do_install() {
    local example cfgs
    check_klipper
    check_venv
    check_repo
    check_link_target
    PY=$VENV_PY
    say "Klipper: $KLIPPER_DIR, venv: $VENV_DIR, config: $CONFIG_DIR"
    [ ! -d "$KLIPPER_DIR/klippy/plugins" ] \
        || say "Kalico detected: linking into klippy/extras, which Kalico loads too"
    install_requirements
    link_module
    add_update_manager
    install_nginx
    install_ffmpeg
    restart_services ""
    cfgs=$(cfg_files)
    if [ -n "$cfgs" ]; then
        say "[polar_cloud] found in: $cfgs"
    else
        example=""
        for example in "$REPO_DIR"/printer_cfg_example* "$REPO_DIR"/*/printer_cfg_example*; do
            [ -e "$example" ] && break
            example=""
        done
        say "next: add this section to printer.cfg, then RESTART Klipper (all options: ${example:-see README.md}):"
        printf '\n[polar_cloud]\n\n'
    fi
    say "then register the printer from the console: POLAR_REGISTER EMAIL=you@example.com PIN=1234"
    say "its identity is kept in ${STATE_DIR:-state_path (relative to klippy)}"
}

check_purge() {  # refuse to delete a state_path that holds more than the identity
    local p real
    [ "$PURGE" = 1 ] && [ -n "$STATE_DIR" ] && [ -d "$STATE_DIR" ] || return 0
    real=$(realpath -m "$STATE_DIR")
    for p in "$HOME" "$DATA_DIR" "$CONFIG_DIR" "$REPO_DIR" "$KLIPPER_DIR" "$VENV_DIR"; do
        case $(realpath -m "$p")/ in "${real%/}"/*)
            die "--purge: $STATE_DIR holds $p, not deleting it (check state_path)" ;;
        esac
    done
    [ ! -e "$STATE_DIR/.git" ] || die "--purge: $STATE_DIR is a git checkout, not an identity folder"
}

do_uninstall() {
    local others hold="" cfgs
    check_purge
    PY=$(command -v python3 || true)
    [ -n "$PY" ] || PY=$VENV_PY
    others=$(other_instances)
    if [ ! -d "$EXTRAS_DIR" ]; then
        say "no Klipper at $KLIPPER_DIR: nothing to unlink"
    elif [ -n "$others" ]; then
        say "link $LINK kept: still used by $others(uninstall those instances first)"
    else
        if [ -L "$LINK" ]; then rm -f "$LINK"; say "removed link $LINK"
        elif [ -e "$LINK" ]; then warn "$LINK is not a link: left alone"; fi
        remove_exclude
    fi
    remove_update_manager
    remove_nginx
    cfgs=$(cfg_files)
    if [ -n "$cfgs" ]; then
        hold="[polar_cloud] is still in $(echo "$cfgs" | tr '\n' ' ')- remove it first or Klipper will not start"
    fi
    restart_services "$hold"
    say "kept: pip packages in $VENV_DIR (other extras may use them)"
    say "kept: this repository ($REPO_DIR) and any moonraker.conf backups"
    if [ -z "$STATE_DIR" ]; then
        say "state_path in [polar_cloud] is relative: delete the identity yourself if you want to"
    elif [ -d "$STATE_DIR" ]; then
        if [ "$PURGE" = 1 ]; then
            rm -rf "$STATE_DIR"
            say "deleted the printer's identity $STATE_DIR (--purge)"
        else
            say "kept: the printer's identity in $STATE_DIR (--purge deletes it)"
        fi
    fi
}

resolve_paths
if [ "$UNINSTALL" = 1 ]; then do_uninstall; else do_install; fi
