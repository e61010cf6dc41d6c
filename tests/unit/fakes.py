"""Fakes for the unit tests: no klippy process, no network, no thread of
their own.

    s = make_session(tmp_path)       # a CloudSession, online, fake link
    deliver(s, "print", {...})       # a cloud event, then one step
    port = FakePort(tmp_path)        # the session as a collaborator sees it
    config = FakeConfig(rotation="90")   # a [polar_cloud] section
    printer = FakePrinter()          # klippy's printer, gcode, webhooks
"""
from __future__ import annotations

import configparser
import math
import os
import random
import socket
import tempfile
import threading
import time
from types import SimpleNamespace
from typing import Any, Optional

import pytest
from PIL import Image

from klippy_extras.polar_cloud import (
    auth,
    connection,
    outage,
    protocol,
    ratelog,
    render,
    states,
    status_view,
)
from klippy_extras.polar_cloud import link as links
from klippy_extras.polar_cloud import session as S
from klippy_extras.polar_cloud.backoff import Backoff
from klippy_extras.polar_cloud.camera import CameraOptions
from klippy_extras.polar_cloud.identity import Identity
from klippy_extras.polar_cloud.options import Options

SERIAL = "KL000042"


# ------------------------------------------------------ the session's world

class FakeBridge:
    """extra.ReactorBridge: records scripts (with their replies) and
    console lines; nothing runs."""

    def __init__(self) -> None:
        self.console_lines: list[str] = []
        self.scripts: list[str] = []
        self.replies: list = []

    def console(self, text: str, error: bool = False, log: bool = True):
        self.console_lines.append(text)

    def call(self, fn, *args) -> None:
        pass

    def run_gcode(self, script: str, reply) -> None:
        self.scripts.append(script)
        self.replies.append(reply)

    def run_gcode_now(self, script: str) -> str:
        self.scripts.append("now: " + script)
        return ""


class FakeQueue:
    def __init__(self) -> None:
        self.size = 0
        self.items: list = []

    def qsize(self) -> int:
        return self.size

    def put(self, item) -> None:
        self.items.append(item)


class FakeEio:
    def __init__(self, sio=None) -> None:
        self.last_rx = 0.
        self.queue = FakeQueue()
        self.ws = None
        self.sio = sio
        self.aborted = False

    def disconnect(self, abort: bool = False) -> None:
        self.aborted = abort
        if self.sio is not None:
            self.sio.connected = False


class FakeSio:
    """A connected python-socketio client that records what is emitted."""

    def __init__(self, fail_connect: bool = False) -> None:
        self.connected = False
        self.fail_connect = fail_connect
        self.emits: list[tuple[str, Any]] = []
        self.eio = FakeEio(self)

    def connect(self, url, **kw) -> None:
        if self.fail_connect:
            raise ConnectionError("refused")
        self.connected = True

    def emit(self, event: str, data, callback=None) -> None:
        self.emits.append((event, data))

    def disconnect(self) -> None:
        self.connected = False


class FakeStore:
    """The identity store, minus crypto and files."""

    def __init__(self) -> None:
        self.wiped = 0
        self.keys_made = 0
        self.key: Any = object()
        self.saved: list[tuple[str, str]] = []

    def sign(self, challenge: str) -> str:
        return "c2lnbmF0dXJl"

    def public_pem(self) -> str:
        return "-----BEGIN PUBLIC KEY-----\nx\n-----END PUBLIC KEY-----\n"

    def machine(self) -> dict:
        return {"mac": "02:00:00:00:00:01", "mfg_sn": "KL-020000000001"}

    def save(self, serial: str, server: str) -> Identity:
        self.saved.append((serial, server))
        return identity(serial)

    def wipe(self) -> None:
        self.wiped += 1

    def load_key(self):
        return self.key

    def create_key(self) -> None:
        self.keys_made += 1
        self.key = object()

    def save_machine(self) -> None:
        pass


class FakeDownload:
    started = 0

    def __init__(self, *args, **kw) -> None:
        pass

    def start(self) -> None:
        FakeDownload.started += 1

    def cancel(self) -> None:
        pass

    def join(self, timeout: float) -> None:
        pass


def identity(serial: str = SERIAL) -> Identity:
    return Identity(serial, "02:00:00:00:00:01", "KL-020000000001",
                    "http://127.0.0.1:1", "fp")


def options(state_path: str, **kw) -> Options:
    base = dict(
        server_url="http://127.0.0.1:1", state_path=state_path,
        manufacturer="kl", printer_make="Cartesian",
        machine_type="Cartesian", status_interval=60., active_interval=10.,
        verbose=False, max_job_size=1 << 20, allow_raw_gcode=False,
        allow_jog=False, cloud_macros=("LOAD_FILAMENT",),
        camera=CameraOptions(enabled=False))
    base.update(kw)
    return Options(**base)


def snapshot(**kw) -> dict:
    """A sample of a ready, idle printer (printer_state.py's shape)."""
    snap = {
        "klippy_state": "ready", "print_state": "standby", "filename": "",
        "print_duration": 0., "total_duration": 0., "filament_used": 0.,
        "progress": 0., "is_active": False, "file_position": 0,
        "file_size": 0, "file_path": "", "wall_time": 1.7e9, "mono": 0.,
        "state_message": "", "heaters": {"tool0": (20., 0.),
                                         "bed": (20., 0.)},
        "static": {"sdcard_dir": tempfile.gettempdir(), "heaters": {
            "tool0": {"name": "extruder", "gcode_name": "extruder",
                      "min": 0., "max": 300.},
            "bed": {"name": "heater_bed", "gcode_name": "heater_bed",
                    "min": 0., "max": 120.}}}}
    snap.update(kw)
    return snap


# Every module of the session that reads the clock (simulated_time)
CLOCKED = (S, connection, status_view, auth, links, ratelog, outage)


def simulated_time(monkeypatch, start: float = 1000.) -> list[float]:
    clock = [start]
    fake = SimpleNamespace(monotonic=lambda: clock[0], time=time.time)
    for module in CLOCKED:
        monkeypatch.setattr(module, "time", fake)
    return clock


def make_session(tmp_path, monkeypatch=None, **opts) -> S.CloudSession:
    """An online session: no threads, no network, no files but state_path.
    s.sios: every Socket.IO client it made."""
    sios: list[FakeSio] = []

    def factory(inbox, verify, timeout, proxy=None):
        sio = FakeSio()
        sios.append(sio)
        return sio
    s = S.CloudSession(options(str(tmp_path), **opts), FakeBridge(), "0.0",
                       client_factory=factory,
                       backoff=Backoff(rand=lambda: .5))
    s.sios = sios
    s.store = FakeStore()
    go_online(s)
    s.post_snapshot(snapshot(), True)
    return s


def go_online(s: S.CloudSession) -> None:
    s.identity = identity()
    s.link = links.Link(FakeSio())
    s.link.sio.connected = True
    s.state = states.ONLINE


def go_unregistered(s: S.CloudSession) -> None:
    s.drop_connection("test")
    s.identity = None
    s.set_state(states.UNREGISTERED, "")


def deliver(s: S.CloudSession, event: str, data: Any = None) -> None:
    """A cloud event as the Socket.IO read thread hands it over, then one
    turn of the supervisor."""
    s.inbox.put_network(event, data)
    s.step(0.)


def emitted(s: S.CloudSession, event: str) -> list:
    """What the session sent as `event`, on every link it had."""
    sios = list(getattr(s, "sios", []))
    if s.link is not None and s.link.sio not in sios:
        sios.append(s.link.sio)
    return [d for sio in sios for e, d in sio.emits if e == event]


class FakePort:
    """The session as its collaborators see it (port.CloudPort), recording
    what they ask of it."""

    def __init__(self, state_path: Any = "", serial: str = SERIAL,
                 **option_values) -> None:
        base = dict(state_path=str(state_path), max_job_size=1 << 20,
                    allow_raw_gcode=False, allow_jog=False, cloud_macros=(),
                    status_interval=60., active_interval=10.,
                    camera=CameraOptions(enabled=False), ca_file="")
        base.update(option_values)
        self.options = SimpleNamespace(**base)
        self.version = "0.0"
        self.stop_event = threading.Event()
        self.abandoned = False
        self.bridge = FakeBridge()
        self.gcode = SimpleNamespace(waiting_script=lambda key: "",
                                     running_script=lambda key: "")
        self.inbox = SimpleNamespace(put_local=lambda *a: None)
        # The lab workflow with its options off (lab.py has its own tests)
        self.lab = SimpleNamespace(
            plate_clear=True, next_print=False, refusal=lambda: "",
            job_finished=lambda state: None, command_list=lambda: [],
            plate_cleared=lambda source: None)
        self.handlers: dict[str, Any] = {}
        self.audits: list[str] = []
        self.logged = self.audits
        self.console_lines: list[str] = []
        self.sent: list[tuple[str, dict]] = []
        self.failures: list[tuple[str, str]] = []
        self.posted: list[tuple] = []
        self.sample: Optional[dict] = None
        self.online = True
        self.emit_ok = True
        self.publishes = 0
        self.status_requests = 0
        self.loopback = False
        self._serial = serial

    def rlog(self, key: str, msg: str, *args, **kw) -> bool:
        self.audits.append(msg % args)
        return True

    def on(self, event: str, handler, online: bool = True) -> None:
        self.handlers[event] = handler

    def post(self, fn, *args) -> None:
        self.posted.append((fn, args))

    def snapshot(self) -> Optional[dict]:
        return self.sample

    def serial(self) -> str:
        return self._serial

    def is_online(self) -> bool:
        return self.online

    def emit(self, event: str, data: dict, callback=None) -> bool:
        if self.emit_ok:
            self.sent.append((event, data))
        return self.emit_ok

    def last_rx(self) -> float:
        return 0.

    def run_gcode(self, key: str, script: str, reply) -> None:
        self.bridge.run_gcode(script, reply)

    def report_failure(self, what: str):
        def reply(ok: bool, error: str) -> None:
            if not ok:
                self.failures.append((what, error))
        return reply

    def console(self, text: str, error: bool = False,
                log: bool = True) -> None:
        self.console_lines.append(text)

    def status_now(self) -> None:
        self.status_requests += 1

    def loopback_test_server(self) -> bool:
        return self.loopback

    def publish(self) -> None:
        self.publishes += 1


# What RemoteCommands is handed with a ready printer
READY = {"klippy_state": "ready", "print_state": "standby"}
MACROS = ("LOAD_FILAMENT",)


def trusted_port(**options) -> FakePort:
    """The session of a printer with allow_raw_gcode and allow_jog on and
    LOAD_FILAMENT as its cloud macro."""
    base = dict(allow_raw_gcode=True, allow_jog=True, cloud_macros=MACROS)
    base.update(options)
    return FakePort(**base)


# ----------------------------------------------------------- klippy's world

class FakeConfig:
    """klippy's ConfigWrapper for one [polar_cloud] section: the values
    given, the getters' range and choice checks, config errors."""
    error = configparser.Error

    def __init__(self, printer=None, sections: Optional[dict] = None,
                 **values) -> None:
        self.values = {k: str(v) for k, v in values.items()}
        self.printer = printer or FakePrinter()
        self.sections = sections or {}

    def get_name(self):
        return "polar_cloud"

    def get_printer(self):
        return self.printer

    def _value(self, option, default, parse, minval=None, maxval=None):
        if option not in self.values:
            return default
        try:
            value = parse(self.values[option])
        except (KeyError, ValueError):
            raise self.error("Option '%s' in section 'polar_cloud' is not"
                             " valid" % (option,)) from None
        if (minval is not None and value < minval) \
                or (maxval is not None and value > maxval):
            raise self.error("Option '%s' in section 'polar_cloud' is out of"
                             " range" % (option,))
        return value

    def get(self, option, default=None, note_valid=True):
        return self._value(option, default, str)

    def getboolean(self, option, default=None):
        return self._value(option, default,
                           lambda v: {"true": True, "false": False}[v.lower()])

    def getint(self, option, default=None, minval=None, maxval=None):
        return self._value(option, default, int, minval, maxval)

    def getfloat(self, option, default=None, minval=None, maxval=None):
        return self._value(option, default, float, minval, maxval)

    def getchoice(self, option, choices, default=None):
        choice = self.get(option, default)
        if choice not in choices:
            raise self.error("Choice '%s' for option '%s' in section 'polar_cloud'"
                             " is not a valid choice" % (choice, option))
        return choices[choice]

    def has_section(self, name: str) -> bool:
        return name in self.sections

    def getsection(self, name: str):
        return FakeSection(name, self.sections[name])

    def get_prefix_sections(self, prefix: str) -> list:
        return [FakeSection(name, values)
                for name, values in self.sections.items()
                if name.startswith(prefix)]


class FakeSection:
    def __init__(self, name: str, values: dict) -> None:
        self.name, self.values = name, values

    def get_name(self) -> str:
        return self.name

    def get(self, option, default=None, note_valid=True):
        return self.values.get(option, default)


class FakeObject:
    """A printer object whose get_status() answers `status` (a dict, or a
    callable of eventtime)."""

    def __init__(self, status: Any = None) -> None:
        self.status = status if status is not None else {}

    def get_status(self, eventtime=None) -> dict:
        return self.status(eventtime) if callable(self.status) \
            else dict(self.status)


class FakeReactor:
    NOW = 0.

    def __init__(self) -> None:
        self.callbacks: list = []
        self.timers: list = []
        self.now = 100.

    def monotonic(self) -> float:
        return self.now

    def register_async_callback(self, callback) -> None:
        self.callbacks.append(callback)

    def run_callbacks(self) -> None:
        callbacks, self.callbacks = self.callbacks, []
        for callback in callbacks:
            callback(self.now)

    def register_timer(self, callback, waketime):
        self.timers.append((callback, waketime))
        return callback


class CommandError(Exception):
    pass


class FakeGcode:
    def __init__(self) -> None:
        self.commands: dict[str, tuple] = {}
        self.info: list[str] = []
        self.raw: list[str] = []
        self.scripts: list[str] = []
        self.fail_with: Optional[Exception] = None

    def register_command(self, name, handler, when_not_ready=False,
                         desc=None):
        if handler is None:         # as klippy: removes, returns the old
            old = self.commands.pop(name, None)
            return old[0] if old else None
        self.commands[name] = (handler, when_not_ready, desc)
        return None

    def respond_info(self, text: str, log: bool = True) -> None:
        self.info.append(text)

    def respond_raw(self, text: str) -> None:
        self.raw.append(text)

    def run_script(self, script: str) -> None:
        self.scripts.append(script)
        if self.fail_with is not None:
            raise self.fail_with


class FakeWebhooks:
    def __init__(self) -> None:
        self.endpoints: dict[str, Any] = {}

    def register_endpoint(self, path: str, handler) -> None:
        self.endpoints[path] = handler


class FakePrinter:
    """klippy's printer: objects by name, event handlers, start args."""
    command_error = CommandError

    def __init__(self, objects: Optional[dict] = None,
                 start_args: Optional[dict] = None) -> None:
        self.reactor = FakeReactor()
        self.objects = {"gcode": FakeGcode(), "webhooks": FakeWebhooks(),
                        "configfile": FakeObject({"settings": {}})}
        self.objects.update(objects or {})
        self.start_args = start_args if start_args is not None else {
            "config_file": "/home/pi/printer_data/config/printer.cfg"}
        self.handlers: dict[str, Any] = {}
        self.state_message = ("Printer is ready", "ready")

    def get_reactor(self) -> FakeReactor:
        return self.reactor

    def lookup_object(self, name: str, default: Any = KeyError):
        if name in self.objects:
            return self.objects[name]
        if default is KeyError:
            raise self.config_error("unknown object %s" % (name,))
        return default

    config_error = configparser.Error

    def lookup_objects(self) -> list:
        return list(self.objects.items())

    def register_event_handler(self, event: str, handler) -> None:
        self.handlers[event] = handler

    def get_start_args(self) -> dict:
        return self.start_args

    def get_state_message(self) -> tuple[str, str]:
        return self.state_message


# Numbers no message may carry, and the check that none does
INF, NAN = float("inf"), float("nan")
HUGE = float("9" * 309)         # what float() makes of 309 nines: inf
HUGE_INT = pytest.param(10 ** 400, id="huge-int")


def message_numbers(msg):
    return [v for v in msg.values()
            if isinstance(v, (int, float)) and not isinstance(v, bool)]


def assert_sendable(msg):
    for value in message_numbers(msg):
        assert math.isfinite(value) and abs(value) <= protocol.MAX_COUNT, msg


# Timelapse frames and ffmpeg
HAVE_FFMPEG = bool(render.find_ffmpeg())
needs_ffmpeg = pytest.mark.skipif(not HAVE_FFMPEG, reason="needs ffmpeg")


def write_frames(folder, count, size=(1280, 720)):
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(4)
    for i in range(1, count + 1):
        img = Image.new("RGB", size, (rng.randrange(256), 90, 160))
        img.paste((255, 255, 255), (i * 8 % size[0], 10, i * 8 % size[0] + 40,
                                    50))
        img.save(os.path.join(folder, "f%08d.jpg" % (i,)), quality=85)


# An upload URL response for a timelapse, a field at a time changed
# (KeyError: left out)
def timelapse_response(**changes):
    data = {"status": "SUCCESS", "serialNumber": "KL000001", "type": "timelapse",
            "jobId": "j-9", "expires": 600, "maxSize": 20_000_000,
            "contentType": "video/mp4", "method": "post",
            "url": "https://bucket.s3.amazonaws.com/",
            "fields": {"key": "a/b.mp4", "Policy": "cG9s"}}
    data.update(changes)
    return {k: v for k, v in data.items() if v is not KeyError}


# The name the test certificates (tests.testbed.tlsproxy.make_certs) are for
NAME = "polar.example.com"


def fake_dns(monkeypatch, answers: list[list[str]]) -> list[str]:
    """NAME resolves to answers[0] on the first lookup, answers[1] on the
    second, ... (the last repeats): a name that rebinds between lookups.
    Returns the list of lookups made."""
    real = socket.getaddrinfo
    calls: list[str] = []

    def getaddrinfo(host, port, *args, **kw):
        if host != NAME:
            return real(host, port, *args, **kw)
        addrs = answers[min(len(calls), len(answers) - 1)]
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "",
                 (addr, int(port or 0))) for addr in addrs]
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return calls
