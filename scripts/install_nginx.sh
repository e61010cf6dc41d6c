#!/bin/bash
# The /polar-cloud/ page through nginx (install.sh --nginx): a snippet that
# serves web/ of this repository, included in Mainsail's or Fluidd's site.
#   install_nginx.sh install   write the snippet, include it, test, reload
#   install_nginx.sh remove    take both out again (install.sh --uninstall)
#   install_nginx.sh snippet   print the snippet (tests/testbed/nginx.py)
# Without nginx, install prints the snippet to add to your web server.
# sudo is used for what it changes under /etc/nginx.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
set -euo pipefail
export LC_ALL=C

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
# Test hooks, as in install.sh: stand-ins for `id -u`, /etc/nginx and
# systemd's /run/systemd/system.
NGINX_DIR=${POLAR_NGINX_DIR:-/etc/nginx}
SYSTEMD_DIR=${POLAR_SYSTEMD_DIR:-/run/systemd/system}
if [ "${POLAR_INSTALL_UID:-$(id -u)}" = 0 ]; then SUDO=(); else SUDO=(sudo); fi
SNIPPET=$NGINX_DIR/snippets/polar_cloud.conf
INCLUDE="include \"$SNIPPET\";"

say()  { printf 'polar_cloud: %s\n' "$*"; }
warn() { printf 'polar_cloud: WARNING: %s\n' "$*" >&2; }

snippet() {
    cat <<EOF
# polar_cloud: added by install.sh --nginx; install.sh --uninstall removes it
location = /polar-cloud {
    return 301 /polar-cloud/;
}
location /polar-cloud/ {
    alias "$REPO_DIR/web/";
    index index.html;
}
EOF
}

nginx_bin() {
    command -v nginx 2>/dev/null && return 0
    if [ -x /usr/sbin/nginx ]; then echo /usr/sbin/nginx; fi
}

ui_sites() {  # the web UIs' sites our include goes into
    local s
    for s in mainsail fluidd; do
        [ -f "$NGINX_DIR/sites-available/$s" ] && printf '%s\n' "$NGINX_DIR/sites-available/$s"
    done
    return 0
}

backup() {  # FILE: a timestamped copy beside it; echoes its name
    local b base n=1
    base=$1.polar_cloud-$(date +%Y%m%d-%H%M%S)
    b=$base.bak
    while [ -e "$b" ]; do b=$base-$n.bak; n=$((n + 1)); done
    "${SUDO[@]}" cp -p "$1" "$b"
    printf '%s\n' "$b"
}

check_reload() {  # BIN: test the config, reload; 1 when nginx rejects it
    "${SUDO[@]}" "$1" -t >/dev/null 2>&1 || return 1
    if command -v systemctl >/dev/null 2>&1 && [ -d "$SYSTEMD_DIR" ]; then
        "${SUDO[@]}" systemctl reload nginx || warn "could not reload nginx"
    else
        say "reload nginx yourself to serve /polar-cloud/"
    fi
}

install_page() {
    local bin site p sites=() undo=()
    if [ ! -d "$REPO_DIR/web" ]; then
        say "--nginx: $REPO_DIR/web does not exist in this version: skipped"
        return 0
    fi
    bin=$(nginx_bin || true)
    if [ -z "$bin" ] || [ ! -d "$NGINX_DIR" ]; then
        say "nginx not installed: put this in your web server's server { } block:"
        snippet
        return 0
    fi
    snippet > "$TMP/snippet"
    if ! cmp -s "$TMP/snippet" "$SNIPPET"; then
        "${SUDO[@]}" mkdir -p "$NGINX_DIR/snippets"
        "${SUDO[@]}" cp "$TMP/snippet" "$SNIPPET"
        "${SUDO[@]}" chmod 644 "$SNIPPET"
        say "wrote $SNIPPET"
    fi
    mapfile -t sites < <(ui_sites)
    for site in "${sites[@]}"; do
        grep -qF "$INCLUDE" "$site" && continue
        INC=$INCLUDE awk '!done && /^[[:space:]]*server_name[[:space:]]/ {
                              print; print "    " ENVIRON["INC"]; done = 1; next }
                          { print } END { exit !done }' "$site" > "$TMP/site" \
            || { warn "no server_name line in $site: add '$INCLUDE' to its server block yourself"; continue; }
        undo+=("$site" "$(backup "$site")")
        "${SUDO[@]}" cp "$TMP/site" "$site"
        say "added the snippet to $site"
    done
    [ ${#sites[@]} -gt 0 ] || say "no mainsail/fluidd site in $NGINX_DIR/sites-available: add '$INCLUDE' to your server block"
    if ! check_reload "$bin"; then
        set -- "${undo[@]}"
        while [ $# -gt 0 ]; do "${SUDO[@]}" cp "$2" "$1"; shift 2; done
        "${SUDO[@]}" rm -f "$SNIPPET"
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

remove_page() {
    local site bin changed=0 b
    while IFS= read -r site; do
        grep -qF "$INCLUDE" "$site" || continue
        INC=$INCLUDE awk '{ line = $0; gsub(/^[[:space:]]+|[[:space:]]+$/, "", line) }
                          line != ENVIRON["INC"]' "$site" > "$TMP/site"
        b=$(backup "$site")
        "${SUDO[@]}" cp "$TMP/site" "$site"
        say "updated $site (backup: $b)"
        changed=1
    done < <(ui_sites)
    if [ -f "$SNIPPET" ]; then "${SUDO[@]}" rm -f "$SNIPPET"; say "removed $SNIPPET"; changed=1; fi
    bin=$(nginx_bin || true)
    if [ "$changed" = 1 ] && [ -n "$bin" ]; then
        check_reload "$bin" || warn "nginx rejects its configuration now: check with 'sudo nginx -t'"
    fi
}

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
case ${1:-} in
    install) install_page ;;
    remove) remove_page ;;
    snippet) snippet ;;
    *) echo "usage: $0 install|remove|snippet" >&2; exit 2 ;;
esac
