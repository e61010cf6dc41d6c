"""Hostile input from the cloud in a real klippy: events named like the
session's own work, and messages too large to decode."""
from __future__ import annotations

import pytest

from tests.testbed.helpers import (
    health_problems,
    log_size,
    polar_lines,
    polar_status,
    proc_stats,
    send_marker,
)

LOCAL_NAMES = ["register", "unregister", "snapshot", "snapshot_done",
               "download_done", "print_started", "job_ack", "_disconnect",
               "_undecodable", "disconnect", "oversized"]


@pytest.fixture(scope="module")
def k(online_klippy):
    return online_klippy()


def test_cloud_events_never_reach_the_sessions_own_work(k, sim):
    start = log_size(k)
    key = (k.state_path / "key.pem").read_bytes()
    connects = sim.connects(k.serial)
    payloads = [["evil@example.org", "1234"], True, ("x", "", 0),
                {"email": "evil@example.org", "pin": "1234"}, None]
    for name in LOCAL_NAMES:
        for data in payloads:
            sim.push(name, data, serial=k.serial)
    send_marker(sim, k.serial, "after-local-names")
    # Still the same printer, online on the same link, key untouched
    assert polar_status(k)["state"] == "online"
    assert polar_status(k)["serial_number"] == k.serial
    assert (k.state_path / "key.pem").read_bytes() == key
    assert sim.received("register") == [] and sim.received("unregister") == []
    assert sim.connects(k.serial) == connects
    lines = polar_lines(k, start)
    unknown = [line for line in lines if "unknown event" in line]
    assert len(unknown) == 1, unknown       # one line for the whole flood
    assert not [line for line in lines if "registering" in line
                or "snapshot" in line]
    assert health_problems(k, start) == []


def test_oversized_message_is_dropped_before_decoding(k, sim):
    start = log_size(k)
    before = proc_stats(k.pid).rss_kb
    connects = sim.connects(k.serial)
    # 3 MB of tiny objects: decoded, tens of megabytes of Python objects
    flood = [{}] * (3 * 1024 * 1024 // 4)
    sim.push("temperature", flood, serial=k.serial)
    big_print = {"jobId": "too-big-1", "jobName": "x" * (2 * 1024 * 1024)}
    since = sim.now()
    sim.push("print", big_print, serial=k.serial)
    # Even a print too large to read is answered, so it cannot hang
    report = sim.wait_for("job", lambda d: d["jobId"] == "too-big-1",
                          since=since, serial=k.serial, timeout=60)
    assert report["state"] == "canceled"
    send_marker(sim, k.serial, "after-oversized")
    grown_mb = (proc_stats(k.pid).rss_kb - before) / 1024.
    assert grown_mb < 20, "klippy grew by %.1f MB" % (grown_mb,)
    lines = polar_lines(k, start)
    assert any("dropped a" in line and "'temperature'" in line
               for line in lines), lines
    assert sim.connects(k.serial) == connects
    assert polar_status(k)["state"] == "online"
    assert health_problems(k, start) == []
