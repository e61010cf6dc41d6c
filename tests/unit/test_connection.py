"""The connection to Polar Cloud (connection.py), through a CloudSession
with a fake Socket.IO client (tests/unit/fakes.py): a slow link holds
status but never job reports (R5); a late welcome and the camera probe's
wait trip no deadline."""
from __future__ import annotations

import logging

import pytest

from klippy_extras.polar_cloud import auth as auth_mod
from klippy_extras.polar_cloud import connection as C
from klippy_extras.polar_cloud import states
from tests.unit.fakes import SERIAL, make_session, simulated_time


def test_slow_link_holds_status_but_never_job_reports(tmp_path, caplog):
    """python-engineio's send queue is unbounded; the session is not."""
    s = make_session(tmp_path)
    s.link.sio.eio.queue.size = C.MAX_OUTBOUND_QUEUE
    with caplog.at_level(logging.INFO, logger="polar_cloud"):
        for _ in range(50):
            assert s.emit("status", {"serialNumber": SERIAL}) is False
        s.jobs.queue_final("j9", "completed", 10., 1.)
    assert [e for e, _ in s.link.sio.emits] == ["job"]
    slow = [r for r in caplog.records if "slow" in r.getMessage()]
    assert len(slow) == 1
    s.link.sio.eio.queue.size = 0
    assert s.emit("status", {"serialNumber": SERIAL}) is True


def test_late_welcome_and_camera_wait_never_trip_a_deadline(tmp_path,
                                                            monkeypatch):
    """A welcome just before its deadline, with the first camera probe
    still running: the hello waits HELLO_CAMERA_WAIT, and neither the
    welcome deadline nor the hello's reply deadline pays for it."""
    clock = simulated_time(monkeypatch)
    s = make_session(tmp_path)
    monkeypatch.setattr(s.camera, "probing", lambda: True)
    s.connect()
    connected = clock[0]
    sio = s.sios[-1]
    clock[0] = connected + C.WELCOME_TIMEOUT - 1.
    s.on_welcome({"challenge": "late"})
    hello_at = clock[0] + C.HELLO_CAMERA_WAIT
    assert s._wait_time() == pytest.approx(1.)
    clock[0] = connected + C.WELCOME_TIMEOUT + .5
    s._tick(clock[0])
    assert s.state == states.CONNECTING and sio.connected
    assert [e for e, _ in sio.emits] == []
    clock[0] = hello_at - .25
    s._tick(clock[0])
    assert s.state == states.CONNECTING
    assert s._wait_time() == pytest.approx(.25)     # wakes for the hello
    clock[0] = hello_at
    s._tick(clock[0])
    assert s.state == states.AUTHENTICATING
    assert [e for e, _ in sio.emits] == ["hello"]
    clock[0] = hello_at + auth_mod.REPLY_TIMEOUT - .01
    s._tick(clock[0])
    assert s.state == states.AUTHENTICATING
    s._dispatch("helloResponse", {"status": "SUCCESS"})
    assert s.state == states.ONLINE
