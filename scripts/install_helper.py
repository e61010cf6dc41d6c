#!/usr/bin/env python3
"""What install.sh asks of Python: the instances, the link into Klipper,
Moonraker's update entry, Moonraker's API, and pip with Klipper's packages
held.

Standard library only. install.sh runs it with the system python3 (3.7 or
newer), and pip-install and imports with the python of klippy's venv, the
one they install into. scripts/testenv.sh uses pip-install too, so the
test venvs hold Klipper's packages exactly as a printer's venv does.

    install_helper.py instances [--all] [-d DIR] [-c DIR] [-i NAME] [-s SERVICE]
                      [--moonraker-service SERVICE] [--moonraker-url URL]
    install_helper.py restart [--hold REASON] [--no-restart] [--force] [--sudo]
                      URL SERVICE...
    install_helper.py installed-elsewhere DATA_DIR
    install_helper.py link-check|unlink KLIPPER_DIR
    install_helper.py link KLIPPER_DIR PACKAGE_DIR
    install_helper.py update-manager install CONFIG_DIR --path REPO
                      --origin URL --venv VENV
    install_helper.py update-manager remove CONFIG_DIR
    install_helper.py pip-install [--hold-file FILE | --hold-dist NAME] -r REQS...
    install_helper.py imports

Messages go to stdout ("polar_cloud: ...") and warnings and errors to
stderr, as install.sh's own. Exit status 1 is an error (the message says
what), and update-manager exits with CHANGED (10) when it changed a file
Moonraker reads.
"""

from __future__ import annotations

import argparse
import fnmatch
import getpass
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from typing import Optional

CHANGED = 10
EXCLUDE_LINE = "/klippy/extras/polar_cloud"
REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
SEP = "\x1f"  # between the fields of an instance (some may be empty)
UM_SECTION = "update_manager polar_cloud"
UM_HEADER = "[%s]" % UM_SECTION
UM_FILE = "polar_cloud_update.conf"
INCLUDE = "[include %s]" % UM_FILE
# The line install.sh wrote above its section before the section moved to
# UM_FILE: an inline section after it is ours to migrate.
OLD_MARK = "# polar_cloud: added by install.sh"
# Klipper's packages when it lists none (scripts/klippy-requirements.txt).
KLIPPER_DEFAULT = ["cffi", "pyserial", "greenlet", "Jinja2", "python-can",
                   "markupsafe"]
# What requirements.txt provides, by import name.
IMPORTS = ["socketio", "engineio", "websocket", "requests", "PIL.Image",
           "cryptography.hazmat.primitives.asymmetric.rsa"]
SECTION_RE = re.compile(r"\s*\[([^\]]+)\]")


class Error(Exception):
    """A failure install.sh reports as ERROR and stops on."""


def say(msg: str) -> None:
    print("polar_cloud: %s" % (msg,), flush=True)


def warn(msg: str) -> None:
    print("polar_cloud: WARNING: %s" % (msg,), file=sys.stderr, flush=True)


# --- Klipper's config: where the module keeps its state ---------------------


def cfg_files(config_dir: str) -> list[str]:
    """Klipper config files that may hold [polar_cloud], SAVE_CONFIG's
    printer-<date>.cfg backups left out."""
    out = []
    for root, dirs, files in os.walk(config_dir):
        dirs.sort()
        for name in sorted(files):
            backup = fnmatch.fnmatch(name, "printer-[0-9]*.cfg")
            if name.endswith(".cfg") and not backup:
                out.append(os.path.join(root, name))
    return out


def read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        return f.read()


def section_value(text: str, section: str, option: str) -> Optional[str]:
    """`option` of [section] in an ini text, inline comment removed; None
    when the section has no such option (or there is no such section)."""
    inside = False
    for line in text.splitlines():
        m = SECTION_RE.match(line)
        if m:
            inside = m.group(1).strip() == section
            continue
        m = re.match(r"\s*([^:=\s]+)\s*[:=](.*)$", line)
        if inside and m and m.group(1).lower() == option:
            return re.sub(r"\s+[#;].*$", "", m.group(2)).strip()
    return None


def has_section(text: str, section: str) -> bool:
    matches = (SECTION_RE.match(line) for line in text.splitlines())
    return any(m and m.group(1).strip() == section for m in matches)


def state_dir(config_dir: str) -> str:
    """Where the module keeps the identity, as it decides: state_path of
    [polar_cloud], else beside the config folder. Empty when state_path is
    relative (to klippy's working directory: unknown here)."""
    config_dir = os.path.normpath(config_dir)
    path = ""
    for cfg in cfg_files(config_dir):
        path = section_value(read_text(cfg), "polar_cloud", "state_path") or ""
        if path:
            break
    parent = os.path.dirname(config_dir)
    if not path:
        # Legacy ~/klipper_config: the module uses a hidden name.
        legacy = os.path.basename(config_dir) != "config"
        return os.path.join(parent, ".polar_cloud" if legacy else "polar_cloud")
    path = os.path.expanduser(path)
    return os.path.normpath(path) if os.path.isabs(path) else ""


def moonraker_url(conf: str) -> str:
    """Moonraker's address on this host, from [server] port of its config."""
    port = None
    if os.path.isfile(conf):
        port = re.sub(r"\D", "", section_value(read_text(conf), "server", "port") or "")
    return "http://127.0.0.1:%s" % (port or 7125,)


# --- instances: one Klipper + Moonraker + printer data directory each --------


def data_dirs(home: str) -> list[str]:
    """The printer data directories under home: ~/printer_data, ~/*_data,
    ~/printer_data_* holding a config/ folder (KIAUH's names)."""
    found = set()
    for pattern in ("*_data", "printer_data_*"):
        for path in glob.glob(os.path.join(glob.escape(home), pattern)):
            if os.path.isdir(os.path.join(path, "config")):
                found.add(path)
    return sorted(found)


def instance_name(data_dir: str) -> str:
    """KIAUH's instance name: "" for ~/printer_data, "2" for
    ~/printer_2_data and ~/printer_data_2, "voron" for ~/voron_data."""
    base = os.path.basename(data_dir)
    if base == "printer_data":
        return ""
    for prefix, suffix in (("printer_data_", ""), ("printer_", "_data"), ("", "_data")):
        if (base.startswith(prefix) and base.endswith(suffix)
                and len(base) > len(prefix) + len(suffix)):
            return base[len(prefix):len(base) - len(suffix)]
    return ""


def pick_data_dirs(home: str, every: bool, data: str, config: str,
                   instance: str) -> list[tuple[str, str, str]]:
    """(data dir, config dir, instance name) of the instances to work on."""
    data, config = (os.path.abspath(p) if p else "" for p in (data, config))
    found = data_dirs(home)
    if every:
        if not found:
            raise Error("--all: no printer data directory found"
                        " (~/printer_data/config, ~/*_data/config)")
        return [(d, os.path.join(d, "config"), instance_name(d)) for d in found]
    if config:
        # The module keeps its state beside the config folder.
        data = data or os.path.dirname(config)
    elif not data and instance:
        names = ["%s_data" % instance, "printer_%s_data" % instance,
                 "printer_data_%s" % instance]
        data = next((os.path.join(home, n) for n in names
                     if os.path.isdir(os.path.join(home, n, "config"))), "")
        if not data:
            raise Error("instance '%s': none of %s has a config/ folder (found: %s)" % (
                instance, ", ".join("~/" + n for n in names), " ".join(found)))
    elif not data:
        if not found:
            raise Error("no printer data directory found (~/printer_data/config):"
                        " pass -d DIR or -c DIR")
        if len(found) > 1:
            raise Error("several printer data directories: %s - pick one with"
                        " --instance NAME or -d DIR, or all of them with --all"
                        % (" ".join(found),))
        data = found[0]
    if not os.path.isdir(data):
        raise Error("printer data directory %s does not exist (use -d DIR)" % (data,))
    return [(data, config or os.path.join(data, "config"), instance)]


def polar_cloud_cfgs(config_dir: str) -> list[str]:
    """The Klipper config files that hold [polar_cloud]."""
    return [f for f in cfg_files(config_dir)
            if has_section(read_text(f), "polar_cloud")]


def instances(a: argparse.Namespace) -> list[list[str]]:
    """Per instance: data dir, config dir, Klipper's and Moonraker's
    services, Moonraker's URL, the state dir (empty for a state_path
    relative to klippy) and the config files that hold [polar_cloud]."""
    if a.all and (a.data or a.config or a.instance or a.service
                  or a.moonraker_service or a.moonraker_url):
        raise Error("--all picks every instance: it does not go with -d, -c, -i,"
                    " -s, --moonraker-service or --moonraker-url")
    out = []
    home = os.path.expanduser("~")
    for data, config, name in pick_data_dirs(home, a.all, a.data, a.config, a.instance):
        suffix = "-" + name if name else ""
        url = a.moonraker_url or moonraker_url(os.path.join(config, "moonraker.conf"))
        state = state_dir(config)
        if state and (os.path.realpath(state) + "/").startswith(REPO + "/"):
            warn("the identity would be stored in the repository (%s): set"
                 " state_path in [polar_cloud]" % (state,))
        out.append([data, config, a.service or "klipper" + suffix,
                    a.moonraker_service or "moonraker" + suffix, url.rstrip("/"),
                    state, " ".join(polar_cloud_cfgs(config))])
    return out


def installed_elsewhere(data_dir: str) -> list[str]:
    """The other instances whose Moonraker still has our update entry."""
    out = []
    for d in data_dirs(os.path.expanduser("~")):
        conf = os.path.join(d, "config", "moonraker.conf")
        if d != data_dir and (
                os.path.exists(os.path.join(d, "config", UM_FILE))
                or os.path.isfile(conf) and has_section(read_text(conf), UM_SECTION)):
            out.append(d)
    return out


# --- the link into Klipper -------------------------------------------------


def _paths(klipper: str) -> tuple[str, str, list[str]]:
    """The link, Klipper's git exclude file, and where Kalico would also
    load the module from (klippy/plugins)."""
    plugins = os.path.join(klipper, "klippy", "plugins", "polar_cloud")
    return (os.path.join(klipper, "klippy", "extras", "polar_cloud"),
            os.path.join(klipper, ".git", "info", "exclude"),
            [plugins, plugins + ".py"])


def link_check(klipper: str) -> None:
    """Refuse, before anything changes, when the link's place is taken."""
    link, _, plugins = _paths(klipper)
    if os.path.exists(link) and not os.path.islink(link):
        raise Error("%s exists and is not a link (an old copy?): move it away and"
                    " run again" % (link,))
    if os.path.exists(link + ".py"):
        raise Error("%s.py exists (another polar_cloud module): remove it and run"
                    " again" % (link,))
    # Kalico loads klippy/extras and klippy/plugins and refuses a module in both.
    for p in plugins:
        if os.path.exists(p) and not os.path.islink(p):
            raise Error("%s exists: Kalico would load polar_cloud twice; remove it"
                        " and run again" % (p,))


def link(klipper: str, package: str) -> None:
    """klippy/extras/polar_cloud -> package, kept out of Klipper's git
    status (Moonraker calls a Klipper with untracked files dirty)."""
    path, exclude, plugins = _paths(klipper)
    for p in plugins:
        if os.path.islink(p):
            os.remove(p)
            say("removed %s (Kalico loads klippy/extras too)" % (p,))
    if os.path.islink(path) and os.readlink(path) == package:
        say("link %s -> %s already in place" % (path, package))
    else:
        if os.path.islink(path):
            say("replacing link %s (was -> %s)" % (path, os.readlink(path)))
            os.remove(path)
        os.symlink(package, path)
        say("linked %s -> %s" % (path, package))
    if not os.path.isdir(os.path.dirname(exclude)):
        return
    text = read_text(exclude) if os.path.exists(exclude) else ""
    if EXCLUDE_LINE not in text.splitlines():
        newline = "\n" if text and not text.endswith("\n") else ""
        with open(exclude, "a", encoding="utf-8") as f:
            f.write(newline + EXCLUDE_LINE + "\n")
        say("added %s to %s" % (EXCLUDE_LINE, exclude))


def unlink(klipper: str) -> None:
    path, exclude, _ = _paths(klipper)
    if os.path.islink(path):
        os.remove(path)
        say("removed link %s" % (path,))
    elif os.path.exists(path):
        warn("%s is not a link: left alone" % (path,))
    lines = read_text(exclude).splitlines(True) if os.path.isfile(exclude) else []
    if any(line.rstrip("\r\n") == EXCLUDE_LINE for line in lines):
        with open(exclude, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write("".join(x for x in lines if x.rstrip("\r\n") != EXCLUDE_LINE))
        say("removed %s from %s" % (EXCLUDE_LINE, exclude))


# --- Moonraker's API -------------------------------------------------------


def _open(url: str, data: Optional[bytes], timeout: float):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return opener.open(url, data=data, timeout=timeout)


def print_state(url: str) -> str:
    """Klipper's print_stats.state as Moonraker reports it, or what kept
    Moonraker from saying: denied, notready, unreachable, unknown."""
    try:
        with _open(url + "/printer/objects/query?print_stats", None, 3) as r:
            status = json.loads(r.read().decode("utf-8"))["result"]["status"]
        return status.get("print_stats", {}).get("state") or "notready"
    except urllib.error.HTTPError as e:
        return "denied" if e.code in (401, 403) else "notready"
    except (urllib.error.URLError, OSError):
        return "unreachable"
    except Exception:
        return "unknown"


def moonraker_restart(url: str, service: str) -> Optional[str]:
    """Ask Moonraker to restart a service (its own unit too: it answers
    first). None when it did, else why not."""
    query = urllib.parse.urlencode({"service": service})
    try:
        with _open("%s/machine/services/restart?%s" % (url, query), b"", 60):
            return None
    except urllib.error.HTTPError as e:
        try:
            why = json.loads(e.read().decode("utf-8"))["error"]["message"]
        except Exception:
            why = e.reason
        return "HTTP %d: %s" % (e.code, why)
    except Exception as e:
        return str(e) or type(e).__name__


def systemctl_restart(service: str, sudo: bool) -> None:
    """The fallback where Moonraker does not answer or cannot restart."""
    # Test hook: a stand-in for systemd's /run/systemd/system.
    systemd = os.environ.get("POLAR_SYSTEMD_DIR", "/run/systemd/system")
    if not shutil.which("systemctl") or not os.path.isdir(systemd):
        say("no systemd here (container?): restart %s yourself to load the change"
            % (service,))
    elif subprocess.call(["systemctl", "cat", service + ".service"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
        warn("no systemd unit %s.service: restart it yourself (or pass -s NAME"
             " or --moonraker-service NAME)" % (service,))
    else:
        user = subprocess.run(["systemctl", "show", "-p", "User", "--value", service],
                              stdout=subprocess.PIPE, text=True).stdout
        if user.strip() and user.strip() != getpass.getuser():
            warn("%s runs as '%s', not as you (%s): run install.sh as '%s'"
                 % (service, user.strip(), getpass.getuser(), user.strip()))
        say("restarting %s" % (service,))
        sudo_cmd = ["sudo"] if sudo else []
        if subprocess.call(sudo_cmd + ["systemctl", "restart", service]):
            warn("could not restart %s" % (service,))


def restart(url: str, services: list[str], force: bool = False, sudo: bool = False,
            hold: str = "", no_restart: bool = False) -> None:
    """Restart the services in order, through Moonraker when it answers,
    else with systemctl. Not with no_restart; not while Klipper prints or
    for a reason to hold, unless force."""
    if hold:
        warn(hold)
        if not force:
            say("not restarting %s (--force-restart overrides)" % (services[0],))
            return
    if no_restart:
        say("not restarting (--no-restart): restart %s to load the change"
            " (sudo systemctl restart %s)" % (services[0], " ".join(services)))
        return
    state = print_state(url)
    if state in ("printing", "paused") and not force:
        warn("Klipper is %s: not restarting now; after the print run:"
             " sudo systemctl restart %s" % (state, " ".join(services)))
        return
    if state in ("denied", "unknown") and not force:
        warn("Moonraker at %s did not say whether a print is running (%s): not"
             " restarting; use --force-restart or restart %s after the print"
             % (url, state, " ".join(services)))
        return
    if state == "unreachable":
        say("Moonraker not reachable at %s: assuming no print is running" % (url,))
    for service in services:
        why = None if state == "unreachable" else moonraker_restart(url, service)
        if state != "unreachable" and why is None:
            say("restarted %s through Moonraker" % (service,))
            continue
        if why:
            say("Moonraker did not restart %s (%s): trying systemctl" % (service, why))
        systemctl_restart(service, sudo)


# --- moonraker.conf: the include of the update_manager section ---------------


def um_block(repo: str, origin: str, venv: str) -> str:
    # "klipper" is a service Moonraker may always restart: moonraker.asvc
    # needs no entry.
    return (
        "# polar_cloud: written by install.sh, included by moonraker.conf with\n"
        "# %s; `install.sh --uninstall` removes both.\n"
        "%s\n"
        "type: git_repo\n"
        "path: %s\n"
        "origin: %s\n"
        "primary_branch: main\n"
        "virtualenv: %s\n"
        "requirements: requirements.txt\n"
        "system_dependencies: system-dependencies.json\n"
        "managed_services: klipper\n" % (INCLUDE, UM_HEADER, repo, origin, venv))


def _norm(line: str) -> str:
    return " ".join(line.split())


def find_section(lines: list[str]) -> Optional[tuple[int, int, bool]]:
    """(start, end, ours) of the [update_manager polar_cloud] section in
    moonraker.conf's lines; ours when install.sh wrote it inline (older
    versions), start then on its marker line."""
    start = next((i for i, line in enumerate(lines) if _norm(line) == UM_HEADER), None)
    if start is None:
        return None
    end = start + 1
    while end < len(lines) and not lines[end].lstrip().startswith("["):
        end += 1
    # Trailing blank and comment lines belong to what follows.
    while end > start + 1 and (not lines[end - 1].strip()
                               or lines[end - 1].lstrip()[:1] in "#;"):
        end -= 1
    ours = start > 0 and lines[start - 1].startswith(OLD_MARK)
    return (start - 1 if ours else start), end, ours


def _cut(lines: list[str], start: int, end: int) -> int:
    """Remove lines[start:end] and the blank line above them; where they were."""
    if start > 0 and not lines[start - 1].strip():
        start -= 1
    del lines[start:end]
    return start


def conf_without_us(text: str) -> str:
    """moonraker.conf without our include line and without the section an
    older install.sh wrote inline."""
    lines = text.splitlines(True)
    found = find_section(lines)
    if found and found[2]:
        _cut(lines, found[0], found[1])
    while True:
        i = next((i for i, line in enumerate(lines) if _norm(line) == INCLUDE), None)
        if i is None:
            return "".join(lines)
        _cut(lines, i, i + 1)


def conf_with_include(text: str) -> str:
    """moonraker.conf including UM_FILE: in place of the section an older
    install.sh wrote inline, else at the end."""
    lines = text.splitlines(True)
    if any(_norm(line) == INCLUDE for line in lines):
        found = find_section(lines)
        if found and found[2]:
            _cut(lines, found[0], found[1])
        return "".join(lines)
    found = find_section(lines)
    if found and found[2]:
        start, end, _ = found
        lines[start:end] = [INCLUDE + "\n"]
        return "".join(lines)
    text = "".join(lines)
    if text and not text.endswith("\n"):
        text += "\n"
    return text + ("\n" if text else "") + INCLUDE + "\n"


def backup(path: str) -> str:
    """A timestamped copy beside path; its name."""
    base = "%s.polar_cloud-%s" % (path, time.strftime("%Y%m%d-%H%M%S"))
    name, n = base + ".bak", 1
    while os.path.exists(name):
        name, n = "%s-%d.bak" % (base, n), n + 1
    shutil.copy2(path, name)
    return name


def write_if_changed(path: str, text: str, keep_backup: bool) -> bool:
    """Write text to path (in place: owner, mode and links stay) unless it
    holds it already; True when written."""
    if os.path.exists(path) and read_text(path) == text:
        return False
    note = ""
    if keep_backup and os.path.exists(path):
        note = " (backup: %s)" % (backup(path),)
    with open(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
        f.write(text)
    say("%s %s%s" % ("updated" if keep_backup else "wrote", path, note))
    return True


def sections_elsewhere(config_dir: str) -> list[str]:
    """Other Moonraker config files in config_dir holding our section."""
    skip = {os.path.join(config_dir, n) for n in ("moonraker.conf", UM_FILE)}
    out = []
    for root, dirs, files in os.walk(config_dir):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            if (name.endswith(".conf") and path not in skip
                    and has_section(read_text(path), UM_SECTION)):
                out.append(path)
    return out


def update_manager_install(config_dir: str, block: str) -> bool:
    """Write UM_FILE and include it in moonraker.conf; True when changed."""
    conf = os.path.join(config_dir, "moonraker.conf")
    if not os.path.isfile(conf):
        warn("%s not found: for updates, put this in a file %s beside your"
             " moonraker.conf and add the line %s to it:" % (conf, UM_FILE, INCLUDE))
        sys.stdout.write(block)
        return False
    elsewhere = sections_elsewhere(config_dir)
    if elsewhere:
        say("%s is already in %s: moonraker.conf left unchanged"
            % (UM_HEADER, " ".join(elsewhere)))
        return False
    text = read_text(conf)
    found = find_section(text.splitlines(True))
    if found and not found[2]:
        say("moonraker.conf has its own %s section: left unchanged" % (UM_HEADER,))
        return False
    # The file first: Moonraker refuses an include that matches no file.
    changed = write_if_changed(os.path.join(config_dir, UM_FILE), block, False)
    if write_if_changed(conf, conf_with_include(text), True):
        changed = True
    elif not changed:
        say("moonraker.conf already includes %s" % (UM_FILE,))
    return changed


def update_manager_remove(config_dir: str) -> bool:
    """Take the include out of moonraker.conf, then delete UM_FILE."""
    conf = os.path.join(config_dir, "moonraker.conf")
    changed = False
    if os.path.isfile(conf):
        changed = write_if_changed(conf, conf_without_us(read_text(conf)), True)
    path = os.path.join(config_dir, UM_FILE)
    if os.path.exists(path):
        os.remove(path)
        say("removed %s" % (path,))
        changed = True
    elsewhere = sections_elsewhere(config_dir)
    if elsewhere:
        warn("%s is still in %s: remove it by hand" % (UM_HEADER, " ".join(elsewhere)))
    return changed


# --- pip: our requirements, Klipper's packages held --------------------------


def requirement_name(line: str) -> Optional[str]:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
    return m.group(1) if m else None


def klipper_requirements(hold_file: Optional[str],
                         hold_dist: Optional[str]) -> list[str]:
    """Klipper's own requirement lines: its scripts/klippy-requirements.txt,
    or the requirements of the installed klippy distribution (the test venvs
    install Klipper from PyPI), else the usual list."""
    from importlib import metadata

    if hold_file and os.path.isfile(hold_file):
        with open(hold_file, encoding="utf-8", errors="replace") as f:
            return [line.split("#", 1)[0].strip() for line in f]
    if hold_dist:
        return [r for r in metadata.requires(hold_dist) or []
                if not re.search(r"\bextra\s*==", r)]
    return list(KLIPPER_DEFAULT)


def klipper_pins(lines: Iterable[str], constraints: bool = False) -> list[str]:
    """name==version of each of Klipper's packages installed here. With
    constraints, also the lines of those not installed that name a
    version, so that pip picks Klipper's if our requirements need one."""
    from importlib import metadata

    out, done = [], set()
    for line in lines:
        name = requirement_name(line)
        if not name:
            continue
        key = re.sub(r"[-_.]+", "-", name).lower()
        try:
            if key not in done:
                out.append("%s==%s" % (name, metadata.version(name)))
            done.add(key)
        except metadata.PackageNotFoundError:
            if constraints and re.search(r"[=<>~!]", line):
                out.append(line.strip())
    return out


def pip(*args: str) -> int:
    return subprocess.call([sys.executable, "-m", "pip", *args,
                            "--disable-pip-version-check"])


def pip_install(requirements: list[str], hold_file: Optional[str],
                hold_dist: Optional[str]) -> None:
    """Install requirement files into this python's environment, every one
    of Klipper's packages held at its installed version."""
    from importlib import metadata

    pip_version = metadata.version("pip")
    if tuple(int(p) for p in re.findall(r"\d+", pip_version)[:2]) < (20, 3):
        # too old for current manylinux wheels
        say("upgrading pip %s in %s" % (pip_version, sys.prefix))
        if pip("install", "-q", "pip>=20.3"):
            raise Error("could not upgrade pip in %s" % (sys.prefix,))
    lines = klipper_requirements(hold_file, hold_dist)
    before = klipper_pins(lines)
    say("installing requirements into %s, holding Klipper's packages: %s" % (
        sys.prefix, " ".join(before) or "none installed, using the versions"
        " Klipper lists"))
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="klipper-pins-") as c:
        c.write("".join(p + "\n" for p in klipper_pins(lines, constraints=True)))
        c.flush()
        args = ["install", "-q", "-c", c.name]
        for r in requirements:
            args += ["-r", r]
        if pip(*args):
            raise Error("pip could not install %s into %s without changing Klipper's"
                        " packages (see pip's message above)"
                        % (" ".join(requirements), sys.prefix))
    after = set(klipper_pins(lines))
    changed = [p for p in before if p not in after]
    if changed:
        raise Error("pip changed Klipper's packages, they were: %s"
                    % (" ".join(changed),))


def check_imports() -> None:
    import importlib

    for name in IMPORTS:
        try:
            importlib.import_module(name)
        except Exception as e:
            raise Error(
                "the requirements do not import in %s: %s: %s (on 32-bit Raspberry Pi"
                " OS, piwheels' Pillow needs e.g. libopenjp2-7 libjpeg62-turbo"
                " libtiff6); Klipper not linked"
                % (sys.prefix, name, e)) from None


# --- command line -------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="install_helper.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("restart")
    p.add_argument("url")
    p.add_argument("services", nargs="+")
    p.add_argument("--force", action="store_true")
    p.add_argument("--sudo", action="store_true")
    p.add_argument("--no-restart", action="store_true")
    p.add_argument("--hold", default="", help="a reason not to restart")
    p = sub.add_parser("instances")
    p.add_argument("--all", action="store_true")
    for opt in ("-d/--data", "-c/--config", "-i/--instance", "-s/--service",
                "--moonraker-service", "--moonraker-url"):
        p.add_argument(*opt.split("/"), default="")
    sub.add_parser("installed-elsewhere").add_argument("data_dir")
    sub.add_parser("link-check").add_argument("klipper")
    p = sub.add_parser("link")
    p.add_argument("klipper")
    p.add_argument("package")
    sub.add_parser("unlink").add_argument("klipper")
    p = sub.add_parser("update-manager")
    p.add_argument("action", choices=["install", "remove"])
    p.add_argument("config_dir")
    p.add_argument("--path", default="")
    p.add_argument("--origin", default="")
    p.add_argument("--venv", default="")
    p = sub.add_parser("pip-install")
    p.add_argument("-r", dest="requirements", action="append", required=True)
    p.add_argument("--hold-file")
    p.add_argument("--hold-dist")
    sub.add_parser("imports")
    a = ap.parse_args(argv)
    try:
        if a.command == "restart":
            restart(a.url.rstrip("/"), a.services, a.force, a.sudo, a.hold,
                    a.no_restart)
        elif a.command == "instances":
            for fields in instances(a):
                print(SEP.join(fields))
        elif a.command == "link-check":
            link_check(a.klipper)
        elif a.command == "link":
            link(a.klipper, a.package)
        elif a.command == "unlink":
            unlink(a.klipper)
        elif a.command == "installed-elsewhere":
            print(" ".join(installed_elsewhere(a.data_dir)))
        elif a.command == "update-manager":
            if a.action == "install":
                changed = update_manager_install(
                    a.config_dir, um_block(a.path, a.origin, a.venv))
            else:
                changed = update_manager_remove(a.config_dir)
            return CHANGED if changed else 0
        elif a.command == "pip-install":
            pip_install(a.requirements, a.hold_file, a.hold_dist)
        elif a.command == "imports":
            check_imports()
    except (Error, OSError) as e:
        print("polar_cloud: ERROR: %s" % (e,), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
