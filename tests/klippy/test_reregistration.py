"""A printer's identity in a real klippy, as the reference clients and the
real cloud expect it: a registration the cloud answers with SERVER_ERROR
is tried again; the job reports of a printer that was deleted or
unregistered never reach the printer registered after it."""
from __future__ import annotations

import json
import re

import pytest

from tests.testbed.gcode_files import demo_print
from tests.testbed.helpers import EMAIL, PIN, polar_status, register, wait_polar

SERVER_ERROR = {"status": "FAILED", "reason": "SERVER_ERROR"}


@pytest.fixture(scope="module")
def k(polar_klippy):
    return polar_klippy("klipper")


def outbox(k) -> list[dict]:
    path = k.state_path / "outbox.json"
    return json.loads(path.read_text()) if path.exists() else []


def test_server_error_is_retried_until_registered(k, sim):
    sim.set_fault("register_reply", SERVER_ERROR)
    sim.set_fault("register_reply", SERVER_ERROR)
    since = sim.now()
    out = k.subscribe_output()
    try:
        k.gcode("POLAR_REGISTER EMAIL=%s PIN=%s" % (EMAIL, PIN))
        for attempt in (2, 3):
            out.wait_for(r"could not add the printer \(SERVER_ERROR\);"
                         r" retrying in \d+ s \(attempt %d of 5\)"
                         % (attempt,), timeout=60)
        line = out.wait_for(r"registered, serial number (\w+)|registration"
                            r" failed", timeout=60)
    finally:
        out.close()
    serial = re.search(r"serial number (\w+)", line).group(1)
    wait_polar(k, lambda st: st.get("state") == "online")
    regs = sim.received("register", since=since)
    assert [(r["email"], r["pin"]) for r in regs] == [(EMAIL, PIN)] * 3
    answers = sim.sent("registerResponse", since=since)
    assert answers[:2] == [SERVER_ERROR] * 2
    assert answers[2]["serialNumber"] == serial
    # Each attempt had its own connection; the hello a fresh one after it
    assert sim.live_sessions(serial) == 1
    assert sim.violations == []
    # The PIN was kept in memory only
    assert PIN not in k.log_text()
    for path in k.state_path.iterdir():
        assert PIN.encode() not in path.read_bytes(), path
    k.serial = serial


@pytest.mark.parametrize("how", ["deleted", "unregistered"])
def test_old_reports_never_reach_the_next_printer(k, sim, how):
    """A cloud job ends while the cloud is unreachable; its report waits
    in outbox.json.  Then the printer is deleted in Polar Cloud (its next
    hello hears DELETED) or unregistered on the printer (FORCE=1), and is
    registered again under a new serial: the old report goes nowhere."""
    if not polar_status(k)["registered"]:
        k.serial = register(k, sim)
    old = k.serial
    job_id = "gone-" + how
    url = sim.add_file(job_id + ".gcode", demo_print(
        moves=120, hotend=0, bed=0, feedrate=3000).encode())
    since = sim.now()
    sim.push_print(old, job_id, gcode_url=url)
    sim.wait_for("status", lambda d: d["status"] == 3, since=since,
                 serial=old, timeout=60)
    out = k.subscribe_output()
    sim.set_fault("refuse_connections", "503")
    try:
        sim.drop(old)
        wait_polar(k, lambda s: s["state"] in ("backoff", "connecting"))
        out.wait_for(r"Polar Cloud: job '.*%s.*' completed" % (job_id,),
                     timeout=90)
        assert [m["jobId"] for m in outbox(k)] == [job_id]
        # Deleted on polar3d.com meanwhile (for "unregistered" too: that
        # is what the console tells the user to do)
        sim.delete_printer(old)
        if how == "unregistered":
            k.gcode("POLAR_UNREGISTER FORCE=1")
            out.wait_for(r"printer %s unregistered on this printer only"
                         % (old,))
    finally:
        sim.set_fault("refuse_connections", False)
        out.close()
    if how == "deleted":
        wait_polar(k, lambda s: s["state"] == "unregistered", timeout=240)
        assert sim.sent("helloResponse", serial=None)[-1]["status"] \
            == "DELETED"
    assert outbox(k) == []
    new = register(k, sim)
    k.serial = new
    assert new != old
    # A job refused at once is the marker: reports go out in order, so
    # an old one would have come first
    marker = "marker-" + how
    sim.push_print(new, marker, stl_url=sim.file_url("x.stl"))
    sim.wait_for("job", lambda d: d["jobId"] == marker, serial=new,
                 timeout=60)
    assert [j["jobId"] for j in sim.received("job", serial=new)] == [marker]
    assert [j for j in sim.received("job") if j["jobId"] == job_id] == []
    assert sim.violations == []
