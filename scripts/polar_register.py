#!/usr/bin/env python3
"""Register this host's printers with Polar Cloud without the PIN going
through G-code, Klipper's API, a log or a shell history.

Run through scripts/register.sh (see its --help).  For every chosen
Klipper instance the e-mail and PIN go into a one-time file in the
instance's state folder (klippy_extras/polar_cloud/handoff.py); the
running polar_cloud module takes it within a second, deletes it and
registers; its answer comes back the same way.  Standard library only.

This file may be distributed under the terms of the GNU GPLv3 license.
"""
from __future__ import annotations

import argparse
import collections
import getpass
import importlib.util
import json
import os
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
PKG_DIR = os.path.join(os.path.dirname(HERE), "klippy_extras", "polar_cloud")
POLL = 0.2
EXIT_FAILED = 1
EXIT_USAGE = 2


def _load(name: str):
    """A module of the package by path: without klippy or the package's
    dependencies (__init__ would import them)."""
    spec = importlib.util.spec_from_file_location(
        "polar_register_" + name, os.path.join(PKG_DIR, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


handoff = _load("handoff")
protocol = _load("protocol")


class UsageError(Exception):
    pass


# --- instances, found as install.sh finds them ---------------------------

@dataclass
class Instance:
    name: str
    data_dir: str
    config_dir: str
    state_dir: str = ""
    socket: str = ""
    has_section: bool = False
    problem: str = ""


def list_data_dirs(home: str) -> list[str]:
    """One printer data folder per instance: ~/*_data, ~/printer_data_*."""
    found = set()
    try:
        names = os.listdir(home)
    except OSError:
        return []
    for name in names:
        if name.endswith("_data") or name.startswith("printer_data_"):
            path = os.path.join(home, name)
            if os.path.isdir(os.path.join(path, "config")):
                found.add(path)
    return sorted(found)


def find_instance_dir(name: str, home: str) -> str:
    candidates = [os.path.join(home, pattern % (name,)) for pattern in (
        "%s", "%s_data", "printer_%s_data", "printer_data_%s")]
    for path in candidates:
        if "/" not in name and os.path.isdir(os.path.join(path, "config")):
            return path
    raise UsageError(
        "instance '%s': none of %s has a config/ folder (found: %s)" % (
            name, ", ".join("~/" + os.path.basename(c) for c in candidates),
            " ".join(list_data_dirs(home)) or "none"))


CFG_SKIP = re.compile(r"^printer-\d.*\.cfg$")     # Klipper's SAVE_CONFIG backups
SECTION = re.compile(r"^\s*\[([^\]]*)\]")
STATE_PATH = re.compile(r"^\s*state_path\s*[:=]\s*(.*)$")
UDS = re.compile(r"^\s*klippy_uds_address\s*[:=]\s*(.*)$")


def _strip_value(value: str) -> str:
    return re.sub(r"\s+[#;].*$", "", value).strip()


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(1 << 20)
    except OSError:
        return ""


def cfg_files(config_dir: str) -> list[str]:
    """Klipper config files that hold a [polar_cloud] section."""
    out = []
    for root, _dirs, files in os.walk(config_dir):
        for name in sorted(files):
            if not name.endswith(".cfg") or CFG_SKIP.match(name):
                continue
            path = os.path.join(root, name)
            if re.search(r"^\s*\[polar_cloud\]", _read_text(path), re.M):
                out.append(path)
    return sorted(out)


def _option(text: str, section: str, pattern: re.Pattern) -> Optional[str]:
    inside = False
    for line in text.splitlines():
        m = SECTION.match(line)
        if m:
            inside = m.group(1).strip() == section
            continue
        if inside:
            m = pattern.match(line)
            if m:
                return _strip_value(m.group(1))
    return None


def state_dir_of(config_dir: str, files: list[str]) -> str:
    """As the module does: state_path, else beside the config folder."""
    for path in files:
        value = _option(_read_text(path), "polar_cloud", STATE_PATH)
        if value:
            value = os.path.expanduser(value)
            if not os.path.isabs(value):
                return ""       # relative to klippy's working folder
            return os.path.normpath(value)
    name = "polar_cloud" if os.path.basename(config_dir) == "config" \
        else ".polar_cloud"
    return os.path.join(os.path.dirname(config_dir), name)


def socket_of(data_dir: str, config_dir: str) -> str:
    """klippy's API socket: Moonraker's klippy_uds_address, else the
    printer_data default."""
    value = _option(_read_text(os.path.join(config_dir, "moonraker.conf")),
                    "server", UDS)
    if value:
        return os.path.expanduser(value)
    return os.path.join(data_dir, "comms", "klippy.sock")


def make_instance(data_dir: str, config_dir: str = "") -> Instance:
    data_dir = os.path.normpath(os.path.abspath(data_dir))
    config_dir = os.path.normpath(os.path.abspath(
        config_dir or os.path.join(data_dir, "config")))
    inst = Instance(os.path.basename(data_dir), data_dir, config_dir)
    files = cfg_files(config_dir)
    inst.has_section = bool(files)
    inst.state_dir = state_dir_of(config_dir, files)
    inst.socket = socket_of(data_dir, config_dir)
    if not inst.state_dir:
        inst.problem = ("state_path in [polar_cloud] is relative: pass"
                        " --state-path")
    return inst


def select_instances(args, home: str) -> list[Instance]:
    if args.all:
        if args.instance or args.data or args.config_dir or args.state_path \
                or args.socket:
            raise UsageError("--all goes alone: it takes every instance"
                             " with default paths")
        dirs = list_data_dirs(home)
        if not dirs:
            raise UsageError("no printer data folder (~/printer_data/config)"
                             " found")
        found = [make_instance(d) for d in dirs]
        return found
    if args.config_dir:
        config_dir = os.path.abspath(args.config_dir)
        inst = make_instance(args.data or os.path.dirname(config_dir),
                             config_dir)
    elif args.data:
        inst = make_instance(args.data)
    elif args.instance:
        inst = make_instance(find_instance_dir(args.instance, home))
    else:
        dirs = list_data_dirs(home)
        if not dirs:
            raise UsageError("no printer data folder (~/printer_data/config)"
                             " found: pass --config-dir DIR")
        if len(dirs) > 1:
            raise UsageError("several printer data folders: %s - pick one"
                             " with --instance NAME, or use --all"
                             % (" ".join(dirs),))
        inst = make_instance(dirs[0])
    if not os.path.isdir(inst.config_dir):
        raise UsageError("%s does not exist" % (inst.config_dir,))
    if args.state_path:
        inst.state_dir = os.path.normpath(os.path.abspath(
            os.path.expanduser(args.state_path)))
        inst.problem = ""
    if args.socket:
        inst.socket = os.path.abspath(args.socket)
    return [inst]


# --- klippy's API socket: only to see whether klippy runs ---------------

@dataclass
class Probe:
    running: Optional[bool]           # None: cannot tell (no socket there)
    klippy_state: str = ""
    polar: Optional[dict] = None      # printer.polar_cloud, None: no object
    text: str = ""


def probe_klippy(path: str, timeout: float = 5.) -> Probe:
    """Ask klippy for its state and printer.polar_cloud (no PIN involved)."""
    if not os.path.exists(path):
        return Probe(None, text="no API socket at %s" % (path,))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return Probe(False, text="klippy is not running (nothing answers"
                         " on %s)" % (path,))
        except OSError as e:
            return Probe(None, text="cannot connect to %s: %s"
                         % (path, e.strerror))
        sock.sendall(json.dumps({"id": 1, "method": "info",
                                 "params": {}}).encode() + b"\x03"
                     + json.dumps({"id": 2, "method": "objects/query",
                                   "params": {"objects": {
                                       "polar_cloud": None}}}).encode()
                     + b"\x03")
        replies: dict = {}
        buf = b""
        deadline = time.monotonic() + timeout
        while len(replies) < 2 and time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            buf += data
            while b"\x03" in buf:
                raw, buf = buf.split(b"\x03", 1)
                try:
                    msg = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(msg, dict) and msg.get("id") in (1, 2):
                    replies[msg["id"]] = msg.get("result")
    except OSError:
        # It answered the connect: it runs, but is busy or went away
        return Probe(True, text="klippy did not answer")
    finally:
        sock.close()
    info = replies.get(1) if isinstance(replies.get(1), dict) else {}
    status = replies.get(2) if isinstance(replies.get(2), dict) else {}
    objects = status.get("status")
    polar = objects.get("polar_cloud") if isinstance(objects, dict) else None
    return Probe(True, klippy_state=str(info.get("state", "")),
                 polar=polar if isinstance(polar, dict) else None)


# --- the registration ------------------------------------------------------

@dataclass
class Job:
    inst: Instance
    request_id: str = ""
    taken: bool = False
    pickup_deadline: float = 0.
    probe: Optional[Probe] = None
    outcome: str = ""       # ok, already, failed, skipped


def refusal(probe: Probe) -> tuple[str, str]:
    """(outcome, text) when nothing is to be sent, else ("", "")."""
    if probe.running is False:
        return "failed", probe.text + "; nothing was sent"
    if probe.running is None or (probe.polar is None
                                 and not probe.klippy_state):
        return "", ""           # cannot tell: try, with a short deadline
    if probe.polar is None:
        if probe.klippy_state != "ready":
            return "failed", "klippy is not ready (%s): fix that first" % (
                probe.klippy_state,)
        return "failed", ("klippy runs without [polar_cloud]: add the"
                          " section to printer.cfg and RESTART first")
    st = probe.polar
    state = st.get("state")
    if st.get("registered") and state != "auth_failed":
        return "already", "already registered as %s; nothing to do" % (
            st.get("serial_number"),)
    if state == "disabled":
        return "failed", "Polar Cloud is disabled here: %s" % (
            st.get("last_error") or "see POLAR_STATUS",)
    if state == "stopped":
        return "failed", ("the Polar Cloud session is not running (klippy"
                          " is %s): fix that first"
                          % (probe.klippy_state or "not ready",))
    if state == "registering":
        return "failed", "a registration is already in progress"
    return "", ""


def say(job: Job, text: str) -> None:
    print("%s: %s" % (job.inst.name, text), flush=True)


def finish(job: Job, outcome: str, text: str) -> None:
    job.outcome = outcome
    say(job, text)


def result_text(result: dict) -> tuple[str, str]:
    if result.get("ok"):
        return "ok", ("registered, serial number %s; it connects to Polar"
                      " Cloud now" % (result.get("serial"),))
    if result.get("already"):
        return "already", "already registered as %s; nothing to do" % (
            result.get("serial"),)
    return "failed", "registration failed: %s" % (
        result.get("reason") or "no reason given",)


def check(job: Job, skip_unconfigured: bool) -> None:
    """Settle what can be settled without the PIN."""
    inst = job.inst
    if not inst.has_section:
        text = "no [polar_cloud] section in %s" % (inst.config_dir,)
        if skip_unconfigured:
            finish(job, "skipped", "skipped: " + text)
        else:
            finish(job, "failed", text)
        return
    if inst.problem:
        finish(job, "failed", inst.problem)
        return
    job.probe = probe_klippy(inst.socket)
    outcome, text = refusal(job.probe)
    if outcome:
        finish(job, outcome, text)


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def send(job: Job, email: str, pin: str, now: float,
         pickup_timeout: float) -> None:
    # Held off until the request is written and known, so that an
    # interruption always finds it to take back
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        job.request_id = handoff.write_request(job.inst.state_dir, email, pin)
    except handoff.HandoffError as e:
        finish(job, "failed", str(e))
        return
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    # The session of an unregistered printer is idle and takes it within a
    # second; key generation and the cloud come after
    job.pickup_deadline = now + pickup_timeout


def poll(job: Job, now: float, deadline: float, timeout: float) -> None:
    state_dir = job.inst.state_dir
    result = handoff.take_result(state_dir, job.request_id)
    if result is not None:
        finish(job, *result_text(result))
        return
    if not job.taken and not handoff.request_waiting(state_dir):
        job.taken = True
    if not job.taken and (now >= job.pickup_deadline or now >= deadline):
        if handoff.withdraw_request(state_dir):
            if job.probe.running is None:
                why = "so it is not running (%s)" % (job.probe.text,)
            else:
                why = ("though klippy runs: its polar_cloud may be older than"
                       " this script (restart Klipper after an update)")
            finish(job, "failed", "klippy did not take the request, %s;"
                   " request removed" % (why,))
            return
        job.taken = True
    if now >= deadline:
        finish(job, "failed", "no result within %d s; see POLAR_STATUS on"
               " this printer" % (timeout,))


def withdraw_all(jobs: list[Job]) -> None:
    for job in jobs:
        if not job.request_id or job.outcome:
            continue
        if not job.taken and handoff.withdraw_request(job.inst.state_dir):
            say(job, "interrupted; request removed")
        else:
            say(job, "interrupted; klippy had the request already: see"
                " POLAR_STATUS")


def register(instances: list[Instance], email: str, get_pin,
             timeout: float, pickup_timeout: float,
             skip_unconfigured: bool = False) -> int:
    jobs = [Job(inst) for inst in instances]
    try:
        for job in jobs:
            check(job, skip_unconfigured)
        todo = [job for job in jobs if not job.outcome]
        if todo:
            # Asked only when there is something to register
            pin = get_pin()
            now = time.monotonic()
            for job in todo:
                send(job, email, pin, now, pickup_timeout)
            pin = ""
        deadline = time.monotonic() + timeout
        while any(not job.outcome for job in jobs):
            time.sleep(POLL)
            now = time.monotonic()
            for job in jobs:
                if not job.outcome:
                    poll(job, now, deadline, timeout)
    finally:
        withdraw_all(jobs)
    counts = collections.Counter(job.outcome for job in jobs)
    if len(jobs) > 1:
        print("%d registered, %d already registered, %d failed%s" % (
            counts["ok"], counts["already"], counts["failed"],
            ", %d skipped" % (counts["skipped"],) if counts["skipped"]
            else ""), flush=True)
    return EXIT_FAILED if counts["failed"] else 0


# --- the PIN ---------------------------------------------------------------

def have_terminal() -> bool:
    """getpass reads from the terminal without echo; without one it would
    read standard input with echo."""
    try:
        os.close(os.open("/dev/tty", os.O_RDWR))
    except OSError:
        return False
    return True


def read_pin(args) -> str:
    if args.pin_file:
        try:
            with open(args.pin_file, encoding="utf-8") as f:
                text = f.read(4096)
        except OSError as e:
            raise UsageError("cannot read %s: %s" % (args.pin_file,
                                                     e.strerror)) from None
        return (text.splitlines() or [""])[0].strip()
    if args.pin_stdin:
        return sys.stdin.readline(4096).strip()
    if not have_terminal():
        raise UsageError("no terminal to ask for the PIN on: use --pin-file"
                         " FILE or --pin-stdin")
    return getpass.getpass("Polar Cloud PIN for %s: " % (args.email,)).strip()


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="register.sh", allow_abbrev=False,
        description="Register this host's Klipper printer(s) with Polar"
        " Cloud. The PIN is asked without echo (or read from a file or"
        " standard input) and handed to the running polar_cloud module"
        " through a one-time file in its state folder: never through"
        " G-code, Klipper's API, a log or the command line.",
        epilog="Exit status: 0 when every printer is registered (or already"
        " was), 1 when one failed, 2 for a usage error.")
    p.add_argument("--email", required=True,
                   help="the e-mail address of the polar3d.com account")
    pin = p.add_mutually_exclusive_group()
    pin.add_argument("--pin-file", metavar="FILE",
                     help="read the PIN from the first line of FILE")
    pin.add_argument("--pin-stdin", action="store_true",
                     help="read the PIN from the first line of standard input")
    which = p.add_argument_group("which printer (default: the only one)")
    which.add_argument("--all", action="store_true",
                       help="every instance on this host (~/printer_data,"
                       " ~/printer_data_N, ~/NAME_data) that has a"
                       " [polar_cloud] section")
    which.add_argument("-i", "--instance", metavar="NAME",
                       help="~/NAME, ~/NAME_data, ~/printer_NAME_data or"
                       " ~/printer_data_NAME")
    which.add_argument("-d", "--data", metavar="DIR",
                       help="the printer data folder (holding config/)")
    which.add_argument("-c", "--config-dir", metavar="DIR",
                       help="the folder holding printer.cfg")
    which.add_argument("--state-path", metavar="DIR",
                       help="the module's state folder, when not the default")
    which.add_argument("--socket", metavar="PATH",
                       help="klippy's API socket [<data>/comms/klippy.sock]")
    p.add_argument("--timeout", type=float, default=90., metavar="S",
                   help="how long to wait for the result [90]")
    p.add_argument("--pickup-timeout", type=float, default=15., metavar="S",
                   help="how long klippy may take to pick the request up"
                   " before it is taken back [15]")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None, home: Optional[str] = None) -> int:
    args = parse_args(argv)
    home = home or os.path.expanduser("~")

    def stop(signum, frame):
        raise KeyboardInterrupt()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    try:
        email = args.email.strip()
        error = protocol.validate_email(email)
        if error:
            raise UsageError(error.replace("EMAIL", "--email"))
        instances = select_instances(args, home)

        def get_pin() -> str:
            pin = read_pin(args)
            error = protocol.validate_pin(pin)
            if error:
                raise UsageError(error)
            return pin
        return register(instances, email, get_pin, args.timeout,
                        args.pickup_timeout, skip_unconfigured=args.all)
    except UsageError as e:
        print("register.sh: %s" % (e,), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("register.sh: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
