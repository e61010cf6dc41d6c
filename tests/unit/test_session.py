"""CloudSession (session.py) without klippy: a fake bridge and a fake
Socket.IO client (tests/unit/fakes.py), events put in its inbox and one
supervisor step at a time.  R-numbers refer to the acceptance list in
docs/testing.md.

- Every inbound handler is fuzzed with hypothesis (R6): nothing escapes,
  nothing but ProtocolErrors, and only allow-listed G-code comes out.
- Exceptions injected into each handler and into the supervisor's work
  (R24): the message is dropped, logged once with a traceback, and the
  session carries on (or reconnects, for a supervisor failure).
- Logs stay quiet through a long outage, with one summary per period (R2).
- An unset clock is named, and retries keep their schedule (R18).
"""
from __future__ import annotations

import collections
import json
import logging
import random
import re
import tempfile
import threading
import time
import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from klippy_extras.polar_cloud import auth as auth_mod
from klippy_extras.polar_cloud import connection as C
from klippy_extras.polar_cloud import dispatch, messages, states
from klippy_extras.polar_cloud import jobs as jobs_mod
from klippy_extras.polar_cloud import link as links
from klippy_extras.polar_cloud import outbox as outbox_mod
from klippy_extras.polar_cloud import session as S
from klippy_extras.polar_cloud.backoff import Backoff
from tests.unit.fakes import (
    CLOCKED,
    SERIAL,
    FakeDownload,
    FakeSio,
    deliver,
    identity,
    make_session,
    simulated_time,
    snapshot,
)

# Every event the cloud may send (docs/protocol.md)
CLOUD_EVENTS = frozenset({
    "welcome", "registerResponse", "helloResponse", "unregisterResponse",
    "getUrlResponse", "capabilitiesResponse", "print", "pause", "resume",
    "cancel", "delete", "temperature", "command", "customCommand",
    "jogPrinter", "connectPrinter", "update", "sendNextPrintResponse",
    "getQueueResponse", "keyPair"})
# Every G-code the session may ever ask klippy to run, with these options
ALLOWED_GCODE = re.compile(
    r"^(SET_HEATER_TEMPERATURE HEATER=(extruder|heater_bed) TARGET=-?\d+\.\d"
    r"(\nSET_HEATER_TEMPERATURE HEATER=(extruder|heater_bed)"
    r" TARGET=-?\d+\.\d)?"
    r"|PAUSE|RESUME|CANCEL_PRINT|LOAD_FILAMENT"
    r'|SDCARD_PRINT_FILE FILENAME="[A-Za-z0-9_.-]+_polar'
    r'(-[A-Za-z0-9_-]+|\.[0-9a-f]{16})\.gcode")$')


# --------------------------------------------------------------- fuzzing

def json_values(leaf=None):
    scalars = (st.none() | st.booleans()
               | st.integers(min_value=-(10 ** 400), max_value=10 ** 400)
               | st.floats(allow_nan=True, allow_infinity=True)
               | st.text(max_size=40))
    if leaf is not None:
        scalars = scalars | leaf
    return st.recursive(scalars, lambda children: st.lists(
        children, max_size=4) | st.dictionaries(st.text(max_size=12),
                                                children, max_size=4),
        max_leaves=12)


KEYS = ["serialNumber", "jobId", "jobName", "gcodeFile", "stlFile",
        "threemfFile", "configFile", "fileToPrint", "tool0", "tool1", "bed",
        "chamber", "command", "jogPrinter", "status", "message", "reason",
        "url", "fields", "expires", "maxSize", "contentType", "type",
        "method", "capabilities", "challenge", "axes", "amount", "x",
        "speed", "absolute"]
INTERESTING = st.sampled_from([
    SERIAL, "KL999999", "job-1", "../../etc/passwd", "SUCCESS", "FAILED",
    "DELETED", "idle", "printing", "post", "image/jpeg", "gcodeFile",
    "http://127.0.0.1:1/x.gcode", "https://169.254.169.254/x",
    "file:///etc/passwd", "200\nM112", "macro/LOAD_FILAMENT",
    "macro/SAVE_CONFIG", "SAVE_CONFIG", "{% raw %}", "home", "jog",
    "extrude", "x" * 5000, 250, -5, 1e308, 10 ** 30])


def payloads():
    value = json_values(INTERESTING)
    objects = st.dictionaries(st.sampled_from(KEYS), value, max_size=8)
    return objects | value


@pytest.fixture(scope="module")
def fuzz_dir():
    with tempfile.TemporaryDirectory() as d:
        yield d


@pytest.mark.parametrize("event", sorted(CLOUD_EVENTS | {"bogus", ""}))
@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(data=payloads(), state=st.sampled_from(
    [states.ONLINE, states.CONNECTING, states.AUTHENTICATING, states.REGISTERING]),
    printing=st.booleans())
def test_every_inbound_handler_survives_any_payload(
        fuzz_dir, monkeypatch, caplog, event, data, state, printing):
    monkeypatch.setattr(jobs_mod, "Download", FakeDownload)
    s = make_session(fuzz_dir)
    s.state = state
    s.deadline = time.monotonic() + 60.     # the reply is not late yet
    if state == states.REGISTERING:
        s.auth.pending_register = ("", "")
    if printing:
        s.post_snapshot(snapshot(print_state="printing",
                                 filename="x.gcode", is_active=True), True)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="polar_cloud"):
        deliver(s, event, data)
    # Hostile input is a ProtocolError or a refusal, never a crash
    crashes = [r for r in caplog.records if r.exc_info
               or r.levelno >= logging.ERROR]
    assert crashes == [], [r.getMessage() for r in crashes]
    for script in s.bridge.scripts:
        assert ALLOWED_GCODE.match(script), script
    for line in s.bridge.console_lines:
        assert len(line) < 600


def test_every_cloud_event_has_a_handler_or_is_named_unsupported(tmp_path):
    s = make_session(tmp_path)
    handled = set(s.dispatcher.handlers)
    assert handled | dispatch.UNSUPPORTED_EVENTS == CLOUD_EVENTS
    assert not handled & dispatch.UNSUPPORTED_EVENTS


def test_flood_of_events_is_one_line_per_kind(tmp_path, caplog):
    s = make_session(tmp_path)
    with caplog.at_level(logging.INFO, logger="polar_cloud"):
        for i in range(1000):
            deliver(s, "temperature", {"bed": "abc"})
            deliver(s, "bogus%d" % (i,), {})
            deliver(s, "command", {"command": "M112"})
            deliver(s, "print", [])
    lines = [r.getMessage() for r in caplog.records]
    # one for all 1,000 unknown names, one per malformed kind
    assert len(lines) == 4, lines
    assert len(s.rlog.last) == 4
    assert s.bridge.scripts == []


# ------------------------------------------------------ exception injection

def boom(*args, **kw):
    raise RuntimeError("injected")


INJECTIONS = [
    # (event, payload, object path to the callee that raises)
    ("print", {"jobId": "j1", "gcodeFile": "http://127.0.0.1:1/a.gcode"},
     "jobs.handle_print"),
    ("pause", {}, "jobs.control"),
    ("resume", {}, "jobs.control"),
    ("cancel", {}, "jobs.control"),
    ("temperature", {"bed": 50}, "commands.temperature"),
    ("command", {"command": "G28"}, "commands.raw_gcode"),
    ("customCommand", {"command": "macro/LOAD_FILAMENT"},
     "commands.custom_command"),
    ("jogPrinter", {"jogPrinter": {"command": "home"}}, "commands.jog"),
    ("connectPrinter", {}, "commands.refuse"),
    ("update", {}, "commands.refuse"),
    ("getUrlResponse", {"status": "SUCCESS"}, "camera.set_slot"),
    ("delete", {}, "store.wipe"),
    ("capabilitiesResponse", {"capabilities": ["x"]}, "capabilities"),
]


@pytest.mark.parametrize("event,payload,target", INJECTIONS,
                         ids=[i[0] for i in INJECTIONS])
def test_injected_handler_exception_is_logged_once_and_contained(
        tmp_path, monkeypatch, caplog, event, payload, target):
    monkeypatch.setattr(jobs_mod, "Download", FakeDownload)
    monkeypatch.setattr("klippy_extras.polar_cloud.camera.parse_url_response",
                        lambda *a: object())
    s = make_session(tmp_path)
    owner_name, _, attr = target.rpartition(".")
    owner = getattr(s, owner_name) if owner_name else s
    if target == "capabilities":
        # a list that blows up when iterated
        payload = {"capabilities": ExplodingList()}
    else:
        monkeypatch.setattr(owner, attr, boom)
    sio = s.link.sio
    with caplog.at_level(logging.INFO, logger="polar_cloud"):
        for _ in range(3):
            deliver(s, event, payload)
    failures = [r for r in caplog.records if r.exc_info]
    assert len(failures) == 1, [r.getMessage() for r in caplog.records]
    assert "could not handle '%s'" % (event,) in failures[0].getMessage()
    # The session kept its link: a bad message is not a bad connection
    assert s.state == states.ONLINE and s.link.sio is sio and sio.connected


class ExplodingList(list):
    def __iter__(self):
        raise RuntimeError("injected")

    def __getitem__(self, item):
        raise RuntimeError("injected")


def run_supervisor(s: S.CloudSession) -> threading.Thread:
    s.start([])
    return s.thread


def wait(pred, timeout=10.):
    ev = threading.Event()
    for _ in range(int(timeout / .02)):
        if pred():
            return True
        ev.wait(.02)
    return pred()


@pytest.mark.parametrize("where", ["jobs.watch", "_check_link",
                                   "reporter.maybe_send_status"])
def test_supervisor_failure_reconnects_and_recovers(tmp_path, monkeypatch,
                                                    caplog, where):
    """The supervisor's periodic work raises once: one traceback, a
    reconnect, online again."""
    s = make_session(tmp_path)
    s.state = states.STOPPED
    s.identity = None
    monkeypatch.setattr(s.store, "load", lambda: identity(), raising=False)
    monkeypatch.setattr(s.jobs, "load", lambda: None)
    owner_name, _, attr = where.rpartition(".")
    owner = getattr(s, owner_name) if owner_name else s
    real = getattr(owner, attr)
    fired = collections.Counter()

    def once(*args, **kw):
        if not fired["n"] and s.state == states.ONLINE:
            fired["n"] += 1
            raise RuntimeError("injected")
        return real(*args, **kw)
    monkeypatch.setattr(owner, attr, once)
    s.backoff = Backoff(base=.05, cap=.05, rand=lambda: .5)
    with caplog.at_level(logging.INFO, logger="polar_cloud"):
        thread = run_supervisor(s)
        try:
            for n in (1, 2):
                assert wait(lambda n=n: len(s.sios) == n)
                s.inbox.put_network("welcome", {"challenge": "c"})
                assert wait(lambda: s.state == states.AUTHENTICATING)
                s.inbox.put_network("helloResponse", {"status": "SUCCESS"})
                if n == 1:
                    # the injected failure drops the link and reconnects
                    assert wait(lambda: len(s.sios) == 2)
            assert wait(lambda: s.state == states.ONLINE)
        finally:
            s.stop()
            thread.join(5.)
    assert not thread.is_alive()
    assert s.sios[0].connected is False
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "session error" in \
        tracebacks[0].getMessage()


# ------------------------------------------------------------- log volume

def cloud_hangs_up(s: S.CloudSession) -> None:
    """The cloud closes the link: python-socketio says so in the inbox."""
    s.link.sio.connected = False
    s.inbox.put_link("disconnect")
    s.step(0.)


def test_long_outage_logs_a_handful_of_lines(tmp_path, monkeypatch, caplog):
    """A 30-minute outage, in simulated time: a line per state change and
    reason, one summary line per 10 minutes, one line when it is over."""
    clock = [1000.]
    fake = types.SimpleNamespace(monotonic=lambda: clock[0], time=time.time)
    for module in CLOCKED:
        monkeypatch.setattr(module, "time", fake)
    s = make_session(tmp_path)
    s.client_factory = lambda inbox, verify, timeout, proxy=None: FakeSio(
        fail_connect=True)
    s.backoff = Backoff(rand=random.Random(3).random)
    attempts = 0
    with caplog.at_level(logging.INFO, logger="polar_cloud"):
        cloud_hangs_up(s)
        while clock[0] < 1000. + 1800.:
            clock[0] = s.retry_at
            s.step(0.)
            attempts += 1
        # The cloud is back
        s.client_factory = lambda inbox, verify, timeout, proxy=None: FakeSio()
        clock[0] = s.retry_at
        s.step(0.)
        deliver(s, "welcome", {"challenge": "c"})
        clock[0] += 4.
        deliver(s, "helloResponse", {"status": "SUCCESS"})
    lines = [r.getMessage() for r in caplog.records]
    assert attempts >= 15
    assert s.state == states.ONLINE and s.outage.since == 0.
    # The lost link and its first refusal; then one summary per period,
    # saying for how long and how many attempts; then back online
    summaries = [line for line in lines if "offline for" in line]
    assert 2 <= len(summaries) <= 3, lines
    assert all(re.search(r"cannot connect to \S+: refused; retry in \d+ s"
                         r" \(offline for \d+ min, \d+ attempts\)", line)
               for line in summaries), summaries
    back = [line for line in lines if "after" in line and "offline" in line]
    assert len(back) == 1 and re.search(
        r"online as KL000042 after 3\d min offline \(%d attempts\)"
        % (attempts + 1,), back[0]), lines
    assert len(lines) <= 4 + len(summaries) + 2, lines


def test_unset_clock_is_named_and_retries_keep_the_schedule(
        tmp_path, monkeypatch):
    """Booted with the clock in 2001 (no RTC, NTP not there yet): the
    status says so instead of a misleading TLS error, retries follow the
    backoff schedule, and once NTP steps the clock the real error shows."""
    clock, wall = [1000.], [978307200.]
    fake = types.SimpleNamespace(monotonic=lambda: clock[0],
                                 time=lambda: wall[0])
    for module in CLOCKED:
        monkeypatch.setattr(module, "time", fake)
    s = make_session(tmp_path)
    s.client_factory = lambda inbox, verify, timeout, proxy=None: FakeSio(
        fail_connect=True)
    cloud_hangs_up(s)
    delays = []
    for _ in range(5):
        delays.append(s.retry_at - clock[0])
        clock[0] = s.retry_at
        s.step(0.)
        assert s.state == states.BACKOFF
        assert s.public["last_error"] == (
            "the system clock is not set (2001-01-01); waiting for NTP")
    assert delays == [2. * 2 ** i for i in range(5)]
    wall[0] = 1795000000.
    clock[0] = s.retry_at
    s.step(0.)
    assert s.public["last_error"].startswith("cannot connect to ")


# ------------------------------------- a deleted printer's reports

def job_ids_sent(sio: FakeSio) -> list[str]:
    return [d["jobId"] for e, d in sio.emits if e == "job"]


def outbox_on_disk(state_dir) -> list[dict]:
    path = state_dir / outbox_mod.OUTBOX_FILE
    return json.loads(path.read_text()) if path.exists() else []


def new_link(s: S.CloudSession) -> FakeSio:
    s.link = links.Link(FakeSio())
    s.link.sio.connected = True
    return s.link.sio


@pytest.mark.parametrize("how", ["delete", "deleted_hello", "unregister",
                                 "force_unregister"])
def test_reports_of_the_old_printer_never_go_out_under_a_new_serial(
        tmp_path, how):
    """Reports queued for the old identity (outbox.json, and the sent but
    unsettled one in memory) and its running cloud job are dropped with
    it; registered again under a new serial, none of them goes out."""
    s = make_session(tmp_path)
    running = "Benchy_polar-old-run.gcode"
    s.jobs.job = jobs_mod.Job("old-run", "Benchy", running, phase="printing")
    s.jobs.queue_final("old-sent", "completed", 60., 100.)
    assert job_ids_sent(s.link.sio) == ["old-sent"]     # not acked yet
    if how in ("deleted_hello", "force_unregister"):
        s._fail("connection lost")
        s.jobs.queue_final("old-offline", "canceled", 5., 1.)
        assert [m["jobId"] for m in outbox_on_disk(tmp_path)] == [
            "old-sent", "old-offline"]
    if how == "delete":
        s._dispatch("delete", {"serialNumber": SERIAL})
    elif how == "unregister":
        s.auth.start_unregister(False)
        s._dispatch("unregisterResponse", {"status": "SUCCESS"})
    elif how == "force_unregister":
        s.auth.start_unregister(True)
    else:
        s.connect()
        s.on_welcome({"challenge": "c"})
        assert s.state == states.AUTHENTICATING
        s._dispatch("helloResponse", {"status": "DELETED"})
    assert s.state == states.UNREGISTERED and s.identity is None
    assert outbox_on_disk(tmp_path) == [] and s.jobs.outbox.unsettled == []
    assert s.jobs.job is None           # the print goes on, as a local one
    s.jobs.queue_final("unregistered", "canceled", 0., 0.)
    assert s.jobs.outbox.pending == []
    # Registered again; the cloud gave a new serial
    s.identity = identity("KL000077")
    sio = new_link(s)
    s.state = states.AUTHENTICATING
    s.authenticated()
    s.jobs.watch(snapshot(print_state="complete", filename=running,
                          print_duration=60.))
    s.jobs.flush()
    assert job_ids_sent(sio) == []
    assert outbox_on_disk(tmp_path) == []


def test_a_left_over_outbox_of_another_serial_is_dropped(tmp_path):
    """outbox.json written under a former identity (and kept over an
    unregistration and a restart) is not sent under the current one."""
    (tmp_path / outbox_mod.OUTBOX_FILE).write_text(json.dumps([
        messages.build_job("KL000001", "theirs", "completed", 1., 1.),
        messages.build_job(SERIAL, "mine", "completed", 1., 1.)]))
    s = make_session(tmp_path)
    s.jobs.load()
    s.jobs.flush()
    assert job_ids_sent(s.link.sio) == ["mine"]
    assert outbox_on_disk(tmp_path) == []


# ------------------------- registration and hello timing

EMAIL, PIN = "maker@school.example.org", "Zq7x91"


def unregistered(tmp_path) -> S.CloudSession:
    s = make_session(tmp_path)
    s.drop_connection("test")
    s.identity = None
    s.set_state(states.UNREGISTERED, "")
    return s


def registers_sent(sio: FakeSio) -> list[dict]:
    return [d for e, d in sio.emits if e == "register"]


SERVER_ERROR = {"status": "FAILED", "reason": "SERVER_ERROR"}


def test_server_error_registration_is_retried_with_backoff(tmp_path,
                                                           monkeypatch):
    clock = simulated_time(monkeypatch)
    s = unregistered(tmp_path)
    s.auth.start_register(EMAIL, PIN)
    for attempt in (1, 2, 3):
        sio = s.sios[-1]
        assert len(s.sios) == attempt and s.state == states.CONNECTING
        s.on_welcome({"challenge": "c%d" % (attempt,)})
        assert [(r["email"], r["pin"]) for r in registers_sent(sio)] == [
            (EMAIL, PIN)]
        if attempt == 3:
            break
        s._dispatch("registerResponse", SERVER_ERROR)
        # Retried like a reconnect: the link is closed, the PIN kept in
        # memory for the next attempt, the console says so
        assert s.state == states.BACKOFF and not sio.connected
        assert s.auth.pending_register == (EMAIL, PIN)
        assert re.match(r"Polar Cloud could not add the printer"
                        r" \(SERVER_ERROR\); retrying in \d+ s \(attempt"
                        r" %d of 5\)" % (attempt + 1,),
                        s.bridge.console_lines[-1])
        assert s.public["state"] == "backoff" and not s.public["registered"]
        clock[0] = s.retry_at - .01
        s._tick(clock[0])
        assert len(s.sios) == attempt
        clock[0] = s.retry_at
        s._tick(clock[0])
    s._dispatch("registerResponse", {"status": "SUCCESS", "reason": "SUCCESS",
                                     "serialNumber": "KL000101"})
    assert s.identity.serial == "KL000101"
    assert s.auth.pending_register is None          # the PIN is gone
    assert s.backoff.attempts == 0
    assert any("registered, serial number KL000101" in line
               for line in s.bridge.console_lines)


def test_registration_gives_up_after_five_server_errors(tmp_path,
                                                        monkeypatch):
    clock = simulated_time(monkeypatch)
    s = unregistered(tmp_path)
    s.auth.start_register(EMAIL, PIN)
    while s.state != states.UNREGISTERED:
        assert s.state == states.CONNECTING
        s.on_welcome({"challenge": "c"})
        s._dispatch("registerResponse", SERVER_ERROR)
        if s.state == states.BACKOFF:
            clock[0] = s.retry_at
            s._tick(clock[0])
    assert len(s.sios) == 5 == sum(len(registers_sent(x)) for x in s.sios)
    assert s.auth.pending_register is None
    assert re.search(r"registration failed: Polar Cloud could not add the"
                     r" printer; try again later \(SERVER_ERROR, 5 attempts"
                     r" in \d+ s\)", s.bridge.console_lines[-1])
    assert "SERVER_ERROR" in s.public["last_error"]
    # Nothing more is tried by itself
    clock[0] += 3600.
    s._tick(clock[0])
    assert len(s.sios) == 5 and s.state == states.UNREGISTERED


@pytest.mark.parametrize("reply", [
    {"status": "FAILED", "reason": "EMAIL_PIN_ERROR"},
    {"status": "FAILED", "reason": "FORBIDDEN"},
    {"status": "FAILED", "reason": "SOMETHING_NEW"},
    {"status": "SUCCESS"}])
def test_other_registration_failures_end_at_once(tmp_path, monkeypatch,
                                                 reply):
    clock = simulated_time(monkeypatch)
    s = unregistered(tmp_path)
    s.auth.start_register(EMAIL, PIN)
    s.on_welcome({"challenge": "c"})
    s._dispatch("registerResponse", reply)
    assert s.state == states.UNREGISTERED
    assert s.auth.pending_register is None
    assert "registration failed" in s.bridge.console_lines[-1]
    clock[0] += 3600.
    s._tick(clock[0])
    assert len(s.sios) == 1


def test_failed_connect_during_server_error_retries_ends_it(tmp_path,
                                                            monkeypatch):
    clock = simulated_time(monkeypatch)
    s = unregistered(tmp_path)
    s.auth.start_register(EMAIL, PIN)
    s.on_welcome({"challenge": "c"})
    s._dispatch("registerResponse", SERVER_ERROR)
    s.client_factory = lambda inbox, verify, timeout, proxy=None: FakeSio(
        fail_connect=True)
    clock[0] = s.retry_at
    s._tick(clock[0])
    assert s.state == states.UNREGISTERED
    assert s.auth.pending_register is None
    assert "registration failed" in s.bridge.console_lines[-1]


def test_hello_connection_waits_two_seconds_after_registering(tmp_path,
                                                              monkeypatch):
    clock = simulated_time(monkeypatch)
    s = unregistered(tmp_path)
    s.auth.start_register(EMAIL, PIN)
    s.on_welcome({"challenge": "c"})
    s._dispatch("registerResponse", {"status": "SUCCESS",
                                     "serialNumber": "KL000101"})
    registered_at = clock[0]
    assert not s.sios[0].connected and s.state == states.CONNECTING
    # Scheduled, not slept: the supervisor's loop wakes in time for it
    assert s._wait_time() == pytest.approx(1.)
    clock[0] = registered_at + 1.5
    assert s._wait_time() == pytest.approx(.5)
    s._tick(clock[0])
    assert len(s.sios) == 1 and s.state == states.CONNECTING
    clock[0] = registered_at + auth_mod.HELLO_AFTER_REGISTER
    s._tick(clock[0])
    assert len(s.sios) == 2 and s.sios[1].connected
    # The welcome deadline counts from this connection
    connected = clock[0]
    clock[0] = connected + C.WELCOME_TIMEOUT - .01
    s._tick(clock[0])
    assert s.state == states.CONNECTING
    clock[0] = connected + C.WELCOME_TIMEOUT
    s._tick(clock[0])
    assert s.state == states.BACKOFF
    assert s.last_error == "no welcome from Polar Cloud"
