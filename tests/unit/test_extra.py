"""The Klipper-facing side (extra.py) with a fake printer, config, gcode
and webhooks: what it registers, get_status and POLAR_STATUS, the checks
of POLAR_REGISTER, the webhooks token, a bug in a handler becoming a
command error, the lifecycle handlers and the ReactorBridge."""
from __future__ import annotations

import logging
import time

import pytest

from klippy_extras import polar_cloud
from klippy_extras.polar_cloud import extra, states
from klippy_extras.polar_cloud.status_view import public_view
from tests.unit.fakes import (
    SERIAL,
    CommandError,
    FakeConfig,
    FakeObject,
    FakePrinter,
    identity,
)


class FakeGcmd:
    def __init__(self, **params) -> None:
        self.params = {k: str(v) for k, v in params.items()}
        self.info: list[str] = []

    def get(self, name, default=None):
        return self.params.get(name, default)

    def get_int(self, name, default=None, minval=None, maxval=None):
        return int(self.params.get(name, default))

    def respond_info(self, text, log=True):
        self.info.append(text)

    def error(self, text):
        return CommandError(text)


class FakeWebRequest:
    def __init__(self, **params) -> None:
        self.params = params
        self.sent = None

    def get_str(self, name, default=KeyError):
        if name not in self.params:
            if default is KeyError:
                raise CommandError("missing %s" % (name,))
            return default
        return str(self.params[name])

    def get(self, name, default=None):
        return self.params.get(name, default)

    def send(self, data):
        self.sent = data


@pytest.fixture
def printer(tmp_path):
    return FakePrinter(start_args={
        "config_file": str(tmp_path / "config" / "printer.cfg")})


@pytest.fixture
def pc(printer, tmp_path):
    """A PolarCloud whose klippy is ready (its session thread not run)."""
    pc = extra.PolarCloud(FakeConfig(printer, webcam_enabled="False"))
    pc.missing = []
    pc.started = True
    return pc


def gcode(printer):
    return printer.lookup_object("gcode")


def run(pc, printer, command, **params) -> FakeGcmd:
    gcmd = FakeGcmd(**params)
    handler = gcode(printer).commands[command][0]
    handler(gcmd)
    return gcmd


def publish(pc, state, error="", registered=True, **fields):
    session = pc.session
    session.identity = identity() if registered else None
    session.state, session.last_error = state, error
    session.public = dict(public_view(session), **fields)


# -------------------------------------------------------- what it registers

def test_load_config_makes_the_extra(printer):
    pc = polar_cloud.load_config(FakeConfig(printer))
    assert isinstance(pc, extra.PolarCloud)


def test_commands_endpoints_and_events_are_registered(pc, printer):
    commands = gcode(printer).commands
    assert sorted(commands) == [
        "POLAR_PLATE_CLEARED", "POLAR_PRINTER_MAKES", "POLAR_REGISTER",
        "POLAR_SNAPSHOT", "POLAR_STATUS", "POLAR_UNREGISTER"]
    # POLAR_STATUS answers while klippy is shut down; each has a help text
    assert [n for n, (_h, when_not_ready, _d) in commands.items()
            if when_not_ready] == ["POLAR_STATUS"]
    assert all(desc for _h, _w, desc in commands.values())
    assert sorted(printer.lookup_object("webhooks").endpoints) == [
        "polar_cloud/plate_cleared", "polar_cloud/register",
        "polar_cloud/status", "polar_cloud/unregister"]
    assert sorted(printer.handlers) == ["klippy:disconnect", "klippy:ready",
                                        "klippy:shutdown"]


def test_nothing_runs_before_klippy_is_ready(printer):
    pc = extra.PolarCloud(FakeConfig(printer))
    assert pc.session.thread is None and printer.reactor.timers == []
    assert pc.get_status()["state"] == states.STOPPED


# ------------------------------------------------------- status and lines

def test_get_status_is_the_sessions_public_view(pc):
    publish(pc, states.ONLINE)
    assert pc.get_status() is pc.session.public
    assert pc.get_status()["serial_number"] == SERIAL


def test_during_backoff_retry_in_counts_down(pc):
    publish(pc, states.BACKOFF, "cannot connect", retries=3, retry_in=99)
    pc.session.retry_at = time.monotonic() + 30.
    status = pc.get_status()
    assert 28 <= status["retry_in"] <= 30 and status["retries"] == 3
    assert pc.session.public["retry_in"] == 99        # never changed in place


def test_status_lines_unregistered(pc):
    publish(pc, states.UNREGISTERED, registered=False)
    assert pc.status_lines()[:3] == [
        "Polar Cloud: unregistered", "server: https://printer4.polar3d.com",
        "not registered (use POLAR_REGISTER EMAIL=... PIN=...)"]
    assert "camera: off (webcam_enabled: False)" in pc.status_lines()


def test_status_lines_in_backoff_with_a_job(pc):
    publish(pc, states.BACKOFF, "cannot connect to x: refused", retries=4,
            job_id="job-7")
    pc.session.retry_at = time.monotonic() + 60.
    lines = pc.status_lines()
    assert lines[0] == "Polar Cloud: backoff (retry 4)"
    assert "serial number: %s" % (SERIAL,) in lines
    assert any(line.startswith("next attempt in about 5") for line in lines)
    assert "current job: job-7" in lines
    assert "last error: cannot connect to x: refused" in lines


def test_polar_status_answers_in_the_console(pc, printer):
    publish(pc, states.ONLINE, online_since="2026-01-01T00:00:00Z")
    gcmd = run(pc, printer, "POLAR_STATUS")
    assert gcmd.info == ["\n".join(pc.status_lines())]
    assert "online since: 2026-01-01T00:00:00Z" in gcmd.info[0]


# --------------------------------------------------------- POLAR_REGISTER

@pytest.mark.parametrize("params,error", [
    ({"PIN": "1234"}, "EMAIL is required"),
    ({"EMAIL": "someone", "PIN": "1234"}, "does not look like an e-mail"),
    ({"EMAIL": "a@b.org"}, "PIN is required"),
    ({"EMAIL": "a@b.org", "PIN": "12 34"}, "letters and digits"),
])
def test_register_rejects_bad_input(pc, printer, params, error):
    publish(pc, states.UNREGISTERED, registered=False)
    with pytest.raises(CommandError, match="POLAR_REGISTER: .*" + error):
        run(pc, printer, "POLAR_REGISTER", **params)
    assert pc.session.inbox.get(0.) is None         # nothing was started


@pytest.mark.parametrize("state,registered,missing,started,error", [
    (states.ONLINE, True, [], True, "already registered as KL000042"),
    (states.REGISTERING, False, [], True, "already in progress"),
    (states.UNREGISTERED, False, ["python-socketio"], True,
     "missing Python packages: python-socketio"),
    (states.UNREGISTERED, False, [], False, "klippy is not ready"),
])
def test_register_refused_in_the_wrong_state(pc, printer, state, registered,
                                             missing, started, error):
    publish(pc, state, registered=registered)
    pc.missing, pc.started = missing, started
    with pytest.raises(CommandError, match=error):
        run(pc, printer, "POLAR_REGISTER", EMAIL="a@b.org", PIN="1234")


def test_register_hands_over_to_the_session_and_returns(pc, printer):
    publish(pc, states.AUTH_FAILED)       # a rejected key may register again
    gcmd = run(pc, printer, "POLAR_REGISTER", EMAIL="maker@school.org",
               PIN="Zq7x91")
    assert gcmd.info == ["Polar Cloud: registering as m***@school.org; the"
                         " result will follow in the console"]
    kind, fn, args = pc.session.inbox.get(0.)
    assert fn == pc.session.auth.start_register
    assert args == ("maker@school.org", "Zq7x91")


def test_unregister_and_snapshot_need_a_running_session(pc, printer):
    pc.started = False
    for command in ("POLAR_UNREGISTER", "POLAR_SNAPSHOT"):
        with pytest.raises(CommandError, match="not (ready|running)"):
            run(pc, printer, command)
    pc.started = True
    run(pc, printer, "POLAR_UNREGISTER", FORCE=1)
    assert pc.session.inbox.get(0.)[2] == (True,)
    run(pc, printer, "POLAR_SNAPSHOT")
    assert pc.session.inbox.get(0.)[1] == pc.session.snapshots.manual


# ------------------------------------------------- guarded handlers

def test_a_bug_in_a_handler_is_a_command_error_not_a_shutdown(
        pc, printer, monkeypatch, caplog):
    def broken():
        raise KeyError("state")
    monkeypatch.setattr(pc, "status_lines", broken)
    with caplog.at_level(logging.ERROR):
        with pytest.raises(CommandError, match="internal error"):
            run(pc, printer, "POLAR_STATUS")
        with pytest.raises(CommandError, match="internal error"):
            pc._handle_status_request(FakeWebRequest())
    assert sum(r.exc_info is not None for r in caplog.records) == 2


def test_a_command_error_passes_through_unchanged(pc, printer):
    publish(pc, states.UNREGISTERED, registered=False)
    with pytest.raises(CommandError, match="^POLAR_REGISTER: EMAIL is"):
        run(pc, printer, "POLAR_REGISTER")


# ------------------------------------------------------ webhooks

def test_register_over_webhooks_needs_the_status_token(pc):
    publish(pc, states.UNREGISTERED, registered=False)
    status = FakeWebRequest()
    pc._handle_status_request(status)
    token = status.sent["token"]
    assert status.sent["state"] == states.UNREGISTERED and status.sent["lines"]
    request = {"email": "a@b.org", "pin": "1234"}
    with pytest.raises(CommandError, match="token"):
        pc._handle_register_request(FakeWebRequest(**request))
    with pytest.raises(CommandError, match="token"):
        pc._handle_register_request(FakeWebRequest(token="x" * 32, **request))
    web = FakeWebRequest(token=token, **request)
    pc._handle_register_request(web)
    assert web.sent == {"state": "registering"}
    assert pc.session.inbox.get(0.)[2] == ("a@b.org", "1234")
    # a token is good for one request
    with pytest.raises(CommandError, match="token"):
        pc._handle_register_request(FakeWebRequest(token=token, **request))


def test_bad_input_over_webhooks_is_refused_before_the_token(pc):
    publish(pc, states.UNREGISTERED, registered=False)
    with pytest.raises(CommandError, match="does not look like an e-mail"):
        pc._handle_register_request(FakeWebRequest(email="x", pin="1"))


def test_unregister_over_webhooks(pc):
    publish(pc, states.ONLINE)
    status = FakeWebRequest()
    pc._handle_status_request(status)
    web = FakeWebRequest(token=status.sent["token"], force="true")
    pc._handle_unregister_request(web)
    assert web.sent == {"state": "unregistering"}
    assert pc.session.inbox.get(0.)[2] == (True,)


# ------------------------------------------------------ lifecycle

def test_ready_in_batch_mode_starts_nothing(printer):
    printer.start_args["debugoutput"] = "out.serial"
    pc = extra.PolarCloud(FakeConfig(printer))
    printer.handlers["klippy:ready"]()
    assert not pc.started and pc.session.thread is None
    assert pc.session.snapshot()["klippy_state"] == "ready"


def test_ready_starts_the_session_and_the_sample_timer(printer, monkeypatch):
    pc = extra.PolarCloud(FakeConfig(printer))
    started = []
    monkeypatch.setattr(pc.session, "start", started.append)
    printer.handlers["klippy:ready"]()
    assert pc.started and started == [pc.missing]
    [(callback, _when)] = printer.reactor.timers
    assert callback(100.) == 100. + extra.SAMPLE_INTERVAL


def test_a_failing_sample_is_retried_later_not_raised(printer, monkeypatch,
                                                      caplog):
    pc = extra.PolarCloud(FakeConfig(printer))
    printer.objects["print_stats"] = FakeObject(lambda t: {}.pop("state"))
    pc.sampler.find_objects()
    with caplog.at_level(logging.ERROR):
        assert pc._sample_event(50.) == 60.
    assert "sampling the printer failed" in caplog.text


def test_shutdown_posts_a_sample_and_disconnect_stops_the_session(
        printer, monkeypatch):
    pc = extra.PolarCloud(FakeConfig(printer))
    pc.started = True
    printer.state_message = ("MCU shutdown", "shutdown")
    printer.handlers["klippy:shutdown"]()
    assert pc.session.snapshot()["klippy_state"] == "shutdown"
    stopped = []
    monkeypatch.setattr(pc.session, "stop", lambda: stopped.append(1))
    printer.handlers["klippy:disconnect"]()
    assert stopped == [1] and pc.bridge.alive is False


# ---------------------------------------------------------- ReactorBridge

def test_the_bridge_runs_calls_on_the_reactor(printer, caplog):
    bridge = extra.ReactorBridge(printer)
    done = []
    bridge.call(done.append, 1)
    assert done == []                       # not on the calling thread
    bridge.call(lambda: 1 / 0)
    with caplog.at_level(logging.ERROR):
        printer.reactor.run_callbacks()
    assert done == [1] and "reactor callback failed" in caplog.text


def test_a_dead_bridge_drops_late_calls(printer):
    bridge = extra.ReactorBridge(printer)
    done = []
    bridge.call(done.append, 1)
    bridge.alive = False
    bridge.call(done.append, 2)
    printer.reactor.run_callbacks()
    assert done == [] and printer.reactor.callbacks == []


def test_the_bridge_runs_gcode_and_replies(printer):
    bridge = extra.ReactorBridge(printer)
    replies = []
    bridge.run_gcode("G28", lambda ok, error: replies.append((ok, error)))
    printer.reactor.run_callbacks()
    gcode(printer).fail_with = CommandError("Must home axis first")
    bridge.run_gcode("G1 X1", lambda ok, error: replies.append((ok, error)))
    printer.reactor.run_callbacks()
    gcode(printer).fail_with = ValueError("bug")
    bridge.run_gcode("M400", lambda ok, error: replies.append((ok, error)))
    printer.reactor.run_callbacks()
    assert gcode(printer).scripts == ["G28", "G1 X1", "M400"]
    assert replies == [(True, ""), (False, "Must home axis first"),
                       (False, "internal error (see klippy.log)")]


def test_the_bridge_console(printer):
    bridge = extra.ReactorBridge(printer)
    bridge.console("Polar Cloud: online")
    bridge.console("Polar Cloud: refused", error=True)
    printer.reactor.run_callbacks()
    assert gcode(printer).info == ["Polar Cloud: online"]
    assert gcode(printer).raw == ["!! Polar Cloud: refused"]


def test_run_gcode_now_only_on_the_reactor(printer):
    bridge = extra.ReactorBridge(printer)       # made on this thread
    assert bridge.run_gcode_now("RESTORE_GCODE_STATE NAME=x") == ""
    gcode(printer).fail_with = CommandError("unknown state")
    assert bridge.run_gcode_now("RESTORE_GCODE_STATE NAME=x") == \
        "unknown state"
    bridge.reactor_thread = -1                  # another thread
    assert bridge.run_gcode_now("M400") == "not on the reactor, queued"
