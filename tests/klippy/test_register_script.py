"""scripts/register.sh: register one or every Klipper instance of a host
from the shell, the PIN handed over in a one-time file (handoff.py) and
never through G-code, Klipper's API, a log or the script's output.

Two real klippy processes on simulated MCUs, each with its own config and
state folder, linked into a fake home as ~/printer_data and
~/printer_data_2 (plus ~/other_data without [polar_cloud]), as on a lab's
multi-instance host; the strict local Polar Cloud; a real Moonraker in
front of the first one.  Each instance gets its own MAC (seeded into
identity.json): two instances of one host share the host's MAC otherwise,
and the cloud would see one printer.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from klippy_extras.polar_cloud.identity import ensure_state_dir, write_json
from tests.testbed.helpers import EMAIL, PIN, REPO, wait_polar
from tests.testbed.klippy import Klippy, KlippyError
from tests.testbed.moonraker import Moonraker

SCRIPT = REPO / "scripts" / "register.sh"
WRONG_PIN = "Wr0ngPin73"
HANDOFF_NAMES = re.compile(r"^(register\.(request|result)|\.register\..*)$")


def load_helper():
    spec = importlib.util.spec_from_file_location(
        "polar_register_under_test", REPO / "scripts" / "polar_register.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module         # for its dataclasses
    spec.loader.exec_module(module)
    return module


R = load_helper()


@dataclass
class Run:
    rc: int
    out: str
    err: str

    def line(self, name: str) -> str:
        found = [line for line in self.out.splitlines()
                 if line.startswith(name + ": ")]
        assert len(found) == 1, (name, self.out, self.err)
        return found[0]


def run_script(home: Path, *args: str, stdin: str | None = None,
               timeout: float = 240) -> Run:
    """register.sh in a session of its own: no terminal to ask a PIN on."""
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--timeout", "150", *args], cwd=str(home),
        input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout,
        env=dict(os.environ, HOME=str(home)), start_new_session=True)
    return Run(proc.returncode, proc.stdout, proc.stderr)


def handoff_files(state: Path) -> list[str]:
    if not state.is_dir():
        return []
    return [n for n in os.listdir(state) if HANDOFF_NAMES.match(n)]


def files_with(root: Path, secret: str, skip: tuple = ()) -> list[str]:
    """Every regular file under root whose bytes hold secret."""
    hits = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if name in skip or not os.path.isfile(path):
                continue            # sockets, the MCU's pty
            with open(path, "rb") as f:
                if secret.encode() in f.read():
                    hits.append(path)
    return hits


def wait_log(k: Klippy, text: str, timeout: float = 30.) -> str:
    """klippy.log once it holds text (klippy logs through a thread)."""
    deadline = time.monotonic() + timeout
    while True:
        log = k.log_text()
        if text in log:
            return log
        if time.monotonic() > deadline:
            raise AssertionError("%r not in klippy.log:\n%s"
                                 % (text, k.log_tail()))
        time.sleep(.1)


def wait_store(mr: Moonraker, text: str, timeout: float = 30.) -> str:
    """Moonraker's G-code store once it holds text (the script's result
    can arrive before the console line does)."""
    deadline = time.monotonic() + timeout
    while True:
        store = mr.get("/server/gcode_store?count=1000")["gcode_store"]
        joined = "\n".join(item["message"] for item in store)
        if text in joined:
            return joined
        if time.monotonic() > deadline:
            raise AssertionError("%r not in the G-code store:\n%s"
                                 % (text, joined[-2000:]))
        time.sleep(.1)


@dataclass
class Lab:
    home: Path
    printers: dict[str, Klippy]


@pytest.fixture(scope="module")
def lab(polar_klippy, tmp_path_factory) -> Lab:
    home = tmp_path_factory.mktemp("home")
    printers = {}
    for i, name in enumerate(("printer_data", "printer_data_2"), 1):
        k = polar_klippy("klipper")
        ensure_state_dir(str(k.state_path))
        write_json(str(k.state_path / "identity.json"),
                   {"mac": "02:00:00:00:10:%02X" % (i,)})
        # As on a host: Moonraker's config names klippy's API socket
        (k.config_dir / "moonraker.conf").write_text(
            "[server]\nklippy_uds_address: %s\n" % (k.api_path,))
        (home / name).symlink_to(k.workdir)
        printers[name] = k
    other = home / "other_data" / "config"
    other.mkdir(parents=True)
    (other / "printer.cfg").write_text("[printer]\nkinematics: none\n")
    return Lab(home, printers)


@pytest.fixture(scope="module")
def pin_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "pin.txt"
    path.write_text(PIN + "\n")
    path.chmod(0o600)
    return path


def assert_clean(lab: Lab, run: Run, secret: str = PIN) -> None:
    """The PIN nowhere: output, state folders, logs; no one-time file."""
    assert secret not in run.out and secret not in run.err
    for k in lab.printers.values():
        assert handoff_files(k.state_path) == [], k.state_path
        assert files_with(k.workdir, secret) == []


# ------------------------------------------------------ real klippys

def test_wrong_pin_is_reported_per_instance(lab, sim):
    since = sim.now()
    run = run_script(lab.home, "--all", "--email", EMAIL, "--pin-stdin",
                     stdin=WRONG_PIN + "\n")
    assert run.rc == 1, (run.out, run.err)
    for name in lab.printers:
        line = run.line(name)
        assert "registration failed: " in line
        assert "e-mail and PIN were not accepted" in line
    assert "skipped" in run.line("other_data")
    assert "0 registered, 0 already registered, 2 failed, 1 skipped" in run.out
    assert len(sim.received("register", since=since)) == 2
    for k in lab.printers.values():
        st = wait_polar(k, lambda s: s["state"] == "unregistered")
        assert not st["registered"]
    assert_clean(lab, run, WRONG_PIN)


def test_every_instance_registers_through_the_script(lab, sim, pin_file):
    since = sim.now()
    run = run_script(lab.home, "--all", "--email", EMAIL, "--pin-file",
                     str(pin_file))
    assert run.rc == 0, (run.out, run.err)
    serials = {}
    for name, k in lab.printers.items():
        m = re.search(r"registered, serial number (\w+)", run.line(name))
        assert m, run.out
        serials[name] = m.group(1)
        k.serial = m.group(1)
    assert len(set(serials.values())) == 2, serials
    assert "2 registered, 0 already registered, 0 failed" in run.out
    regs = sim.received("register", since=since)
    assert sorted(r["myInfo"]["MAC"] for r in regs) == [
        "02:00:00:00:10:01", "02:00:00:00:10:02"]
    for name, k in lab.printers.items():
        st = wait_polar(k, lambda s: s["state"] == "online")
        assert st["serial_number"] == serials[name]
        sim.wait_until(lambda s=serials[name]: sim.live_sessions(s) == 1)
    # The console said it came from the shell, with no note about the PIN
    wait_log(lab.printers["printer_data"],
             "registered as %s" % (serials["printer_data"],))
    assert_clean(lab, run)
    assert sim.violations == []


def test_running_it_again_changes_nothing_and_asks_nothing(lab, sim):
    since = sim.now()
    # No PIN option and no terminal: asking for one would fail the run
    run = run_script(lab.home, "--all", "--email", EMAIL)
    assert run.rc == 0, (run.out, run.err)
    for name, k in lab.printers.items():
        assert "already registered as %s" % (k.serial,) in run.line(name)
    assert sim.received("register", since=since) == []
    assert_clean(lab, run)


@pytest.fixture(scope="module")
def mr(lab):
    m = Moonraker(lab.printers["printer_data"]).start()
    yield m
    m.stop()


def test_one_instance_then_an_emergency_stop_leaves_the_pin_nowhere(
        lab, sim, pin_file, mr):
    """Registered through the script with Moonraker in front, then M112 at
    once: klippy dumps its recent G-code and API requests into klippy.log,
    Moonraker keeps its G-code store; the PIN is in neither."""
    k = lab.printers["printer_data"]
    out = k.subscribe_output()
    try:
        k.gcode("POLAR_UNREGISTER")
        out.wait_for(r"printer \w+ unregistered")
    finally:
        out.close()
    wait_polar(k, lambda s: s["state"] == "unregistered")
    run = run_script(lab.home, "--config-dir",
                     str(lab.home / "printer_data" / "config"), "--email",
                     EMAIL, "--pin-file", str(pin_file))
    assert run.rc == 0, (run.out, run.err)
    m = re.search(r"^printer_data: registered, serial number (\w+)", run.out,
                  re.M)
    assert m, run.out
    try:
        k.gcode("M112")
    except KlippyError:
        pass                                # the request ends in shutdown
    k.wait_state("shutdown")
    log = wait_log(k, "Dumping gcode input")
    assert "Dumping" in log and "requests for client" in log
    assert PIN not in log
    # Moonraker's console history holds the result, not the PIN
    text = wait_store(mr, "registered, serial number %s" % (m.group(1),))
    assert "requested from the shell" in text
    assert "console history" not in text            # no note: nothing typed
    assert PIN not in text
    assert files_with(k.workdir, PIN) == []         # moonraker.log, database
    assert_clean(lab, run)
    k.restart(firmware=True)
    st = wait_polar(k, lambda s: s["state"] == "online")
    assert st["serial_number"] == m.group(1)
    k.serial = m.group(1)


def test_a_stopped_klippy_gets_no_request(lab, pin_file):
    k = lab.printers["printer_data_2"]
    k.stop()
    run = run_script(lab.home, "--instance", "2", "--email", EMAIL,
                     "--pin-file", str(pin_file), "--pickup-timeout", "3")
    assert run.rc == 1, (run.out, run.err)
    assert "not running" in run.line("printer_data_2")
    assert handoff_files(k.state_path) == []
    assert PIN not in run.out + run.err


# ------------------------------------------------ no klippy at all

def fake_instance(home: Path, name: str, section: str = "[polar_cloud]\n"
                  ) -> Path:
    data = home / name
    (data / "config").mkdir(parents=True)
    (data / "config" / "printer.cfg").write_text(section)
    (data / "comms").mkdir()
    return data


def test_nothing_answering_on_the_socket_means_nothing_sent(tmp_path,
                                                            pin_file):
    data = fake_instance(tmp_path, "printer_data")
    # A socket file left by a klippy that is gone: connections are refused
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(data / "comms" / "klippy.sock"))
    sock.close()
    run = run_script(tmp_path, "--email", EMAIL, "--pin-file", str(pin_file))
    assert run.rc == 1, (run.out, run.err)
    line = run.line("printer_data")
    assert "klippy is not running" in line and "nothing was sent" in line
    assert handoff_files(data / "polar_cloud") == []


def test_without_a_socket_the_request_is_withdrawn(tmp_path, pin_file):
    data = fake_instance(tmp_path, "printer_data")
    run = run_script(tmp_path, "--email", EMAIL, "--pin-file", str(pin_file),
                     "--pickup-timeout", "2")
    assert run.rc == 1, (run.out, run.err)
    line = run.line("printer_data")
    assert "did not take the request" in line and "removed" in line
    # The request was really written (the folder was made for it), then
    # taken back
    assert (data / "polar_cloud").is_dir()
    assert handoff_files(data / "polar_cloud") == []
    assert files_with(tmp_path, PIN, skip=("pin.txt",)) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_an_interrupted_run_takes_its_request_back(tmp_path, pin_file, sig):
    """Killed while waiting (or its ssh session gone): nothing stays."""
    data = fake_instance(tmp_path, "printer_data")
    request = data / "polar_cloud" / "register.request"
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), "--email", EMAIL, "--pin-file", str(pin_file),
         "--pickup-timeout", "600"], cwd=str(tmp_path),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
        env=dict(os.environ, HOME=str(tmp_path)))
    try:
        deadline = time.monotonic() + 60
        while not request.exists():         # the request is written
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no request written"
            time.sleep(.05)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, (out, err)
    assert "printer_data: interrupted; request removed" in out
    assert handoff_files(data / "polar_cloud") == []


def read_tty(fd: int, until: bytes, timeout: float = 60.) -> bytes:
    """What the terminal shows until `until` (or the end)."""
    out = b""
    deadline = time.monotonic() + timeout
    while until not in out:
        left = deadline - time.monotonic()
        assert left > 0, out
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        try:
            data = os.read(fd, 4096)
        except OSError:             # EIO: the child closed the terminal
            break
        if not data:
            break
        out += data
    return out


def test_the_pin_is_asked_on_the_terminal_without_echo(tmp_path):
    data = fake_instance(tmp_path, "printer_data")
    pid, fd = pty.fork()
    if pid == 0:                                    # the child: a terminal
        os.environ["HOME"] = str(tmp_path)
        os.execvp("bash", ["bash", str(SCRIPT), "--email", EMAIL,
                           "--pickup-timeout", "1"])
    try:
        shown = read_tty(fd, b"PIN for %s: " % (EMAIL.encode(),))
        os.write(fd, PIN.encode() + b"\n")
        shown += read_tty(fd, b"\x00")                # to the end
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    text = shown.decode("utf-8", "replace")
    assert PIN not in text, text
    # It got the PIN: the request was made (and taken back: no klippy)
    assert "printer_data: klippy did not take the request" in text, text
    assert os.waitstatus_to_exitcode(status) == 1
    assert handoff_files(data / "polar_cloud") == []


class FakeKlippyApi:
    """A unix socket answering klippy's `info` and `objects/query` as a
    klippy with the given state and printer.polar_cloud would."""

    def __init__(self, path: Path, state: str, polar: dict | None) -> None:
        self.state, self.polar = state, polar
        self.methods: list[str] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                buf = b""
                while True:
                    data = conn.recv(4096)
                    if not data:
                        break
                    buf += data
                    while b"\x03" in buf:
                        raw, buf = buf.split(b"\x03", 1)
                        conn.sendall(json.dumps(self._answer(json.loads(raw)))
                                     .encode() + b"\x03")

    def _answer(self, req: dict) -> dict:
        self.methods.append(req["method"])
        if req["method"] == "info":
            return {"id": req["id"], "result": {"state": self.state}}
        status = {} if self.polar is None else {"polar_cloud": self.polar}
        return {"id": req["id"], "result": {"eventtime": 1., "status": status}}

    def close(self) -> None:
        self.sock.close()


UNREGISTERED = {"state": "unregistered", "registered": False,
                "serial_number": "", "last_error": ""}


@pytest.mark.parametrize("state,polar,rc,expected", [
    ("ready", dict(UNREGISTERED, state="online", registered=True,
                   serial_number="KL000777"), 0,
     "already registered as KL000777; nothing to do"),
    ("ready", None, 1, "klippy runs without [polar_cloud]"),
    ("startup", None, 1, "klippy is not ready (startup)"),
    ("ready", dict(UNREGISTERED, state="disabled",
                   last_error="missing Python packages: requests"), 1,
     "disabled here: missing Python packages: requests"),
    ("ready", dict(UNREGISTERED, state="registering"), 1,
     "a registration is already in progress"),
    ("startup", dict(UNREGISTERED, state="stopped"), 1,
     "the Polar Cloud session is not running (klippy is startup)"),
])
def test_what_klippy_says_settles_it_without_the_pin(tmp_path, state, polar,
                                                     rc, expected):
    data = fake_instance(tmp_path, "printer_data")
    api = FakeKlippyApi(data / "comms" / "klippy.sock", state, polar)
    try:
        # No PIN option and no terminal: asking for one would fail the run
        run = run_script(tmp_path, "--email", EMAIL)
    finally:
        api.close()
    assert run.rc == rc, (run.out, run.err)
    assert expected in run.line("printer_data")
    assert api.methods == ["info", "objects/query"]
    assert not (data / "polar_cloud").exists()


def test_a_klippy_that_takes_nothing_gets_its_request_back(tmp_path,
                                                           pin_file):
    """klippy answers, but runs a polar_cloud from before register.sh."""
    data = fake_instance(tmp_path, "printer_data")
    api = FakeKlippyApi(data / "comms" / "klippy.sock", "ready", UNREGISTERED)
    try:
        run = run_script(tmp_path, "--email", EMAIL, "--pin-file",
                         str(pin_file), "--pickup-timeout", "2")
    finally:
        api.close()
    assert run.rc == 1, (run.out, run.err)
    line = run.line("printer_data")
    assert "did not take the request, though klippy runs" in line
    assert "restart Klipper" in line and "request removed" in line
    assert handoff_files(data / "polar_cloud") == []


def test_bad_arguments_are_refused_before_anything_happens(tmp_path):
    fake_instance(tmp_path, "printer_data")
    fake_instance(tmp_path, "printer_data_2")
    run = run_script(tmp_path, "--email", "not-an-address", "--pin-stdin",
                     stdin="1234\n")
    assert run.rc == 2 and "--email does not look like an e-mail" in run.err
    run = run_script(tmp_path, "--email", EMAIL, "--pin-stdin",
                     stdin="1234\n")
    assert run.rc == 2 and "several printer data folders" in run.err
    run = run_script(tmp_path, "--instance", "3", "--email", EMAIL)
    assert run.rc == 2 and "instance '3'" in run.err
    run = run_script(tmp_path, "--instance", "2", "--email", EMAIL,
                     "--pin-stdin", stdin="12 34\n")
    assert run.rc == 2 and "letters and digits" in run.err
    run = run_script(tmp_path, "--instance", "2", "--email", EMAIL)
    assert run.rc == 2 and "no terminal to ask for the PIN" in run.err
    for name in ("printer_data", "printer_data_2"):
        assert handoff_files(tmp_path / name / "polar_cloud") == []


# ------------------------------------------ discovery, as install.sh

def test_instances_are_found_as_install_sh_finds_them(tmp_path):
    home = tmp_path
    fake_instance(home, "printer_data")
    fake_instance(home, "printer_data_2", "[polar_cloud]\nstate_path:"
                  " ~/elsewhere/pc  # comment\n")
    fake_instance(home, "voron_data", "[printer]\n")
    (home / "printer_data_old").mkdir()             # no config/: not one
    (home / "printer_data" / "config" / "moonraker.conf").write_text(
        "[server]\nport: 7125\nklippy_uds_address: /tmp/k.sock\n")
    (home / "printer_data" / "config" / "printer-20240101_120000.cfg"
     ).write_text("[polar_cloud]\nstate_path: /wrong\n")
    assert R.list_data_dirs(str(home)) == [
        str(home / n) for n in ("printer_data", "printer_data_2",
                                "voron_data")]
    for name, want in (("2", "printer_data_2"),
                       ("printer_data_2", "printer_data_2"),
                       ("voron", "voron_data")):
        assert R.find_instance_dir(name, str(home)) == str(home / want)
    with pytest.raises(R.UsageError, match="instance 'nope'"):
        R.find_instance_dir("nope", str(home))
    one = R.make_instance(str(home / "printer_data"))
    assert one.has_section and one.state_dir == str(
        home / "printer_data" / "polar_cloud")
    assert one.socket == "/tmp/k.sock"
    two = R.make_instance(str(home / "printer_data_2"))
    assert two.state_dir == os.path.expanduser("~/elsewhere/pc")
    assert two.socket == str(home / "printer_data_2" / "comms" / "klippy.sock")
    assert not R.make_instance(str(home / "voron_data")).has_section
    # The legacy layout (~/klipper_config): the module's hidden name
    legacy = home / "klipper_config"
    legacy.mkdir()
    (legacy / "printer.cfg").write_text("[polar_cloud]\n")
    inst = R.make_instance(str(home), str(legacy))
    assert inst.state_dir == str(home / ".polar_cloud")
    # A relative state_path cannot be found from here
    (home / "printer_data" / "config" / "printer.cfg").write_text(
        "[polar_cloud]\nstate_path: pc\n")
    assert "relative" in R.make_instance(str(home / "printer_data")).problem


def test_pin_sources(tmp_path, monkeypatch):
    args = R.parse_args(["--email", EMAIL, "--pin-file",
                         str(tmp_path / "pin")])
    (tmp_path / "pin").write_text("  4321  \nsecond line\n")
    assert R.read_pin(args) == "4321"
    args = R.parse_args(["--email", EMAIL, "--pin-stdin"])
    monkeypatch.setattr("sys.stdin", io.StringIO("4321\nmore\n"))
    assert R.read_pin(args) == "4321"
    # Interactive: getpass (no echo) on the terminal only
    args = R.parse_args(["--email", EMAIL])
    asked = []
    monkeypatch.setattr(R.getpass, "getpass",
                        lambda prompt: asked.append(prompt) or "9876\n")
    monkeypatch.setattr(R, "have_terminal", lambda: True)
    assert R.read_pin(args) == "9876" and EMAIL in asked[0]
    monkeypatch.setattr(R, "have_terminal", lambda: False)
    with pytest.raises(R.UsageError, match="no terminal"):
        R.read_pin(args)
    # The PIN is never an argument of its own
    with pytest.raises(SystemExit):
        R.parse_args(["--email", EMAIL, "--pin", "1234"])
