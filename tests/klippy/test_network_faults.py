"""Network faults against a real klippy on the simulated MCU, with
the printer's link to the local Polar Cloud running through a
fault-injecting proxy (tests/testbed/faultproxy.py).

Every case asserts what klippy, the proxy and the simulator actually saw:
states and the published backoff schedule (printer.polar_cloud `retries`
and `retry_in`), connection attempts counted at the cloud, job reports,
print_stats, klippy.log.  No case asserts on elapsed time.  R-numbers refer
to the acceptance list in docs/testing.md.
"""
from __future__ import annotations

import re

import pytest

from tests.testbed.gcode_files import demo_print
from tests.testbed.helpers import (
    StateHistory,
    check_schedule,
    final_reports,
    fresh_session,
    health_problems,
    log_size,
    polar_lines,
    send_marker,
    start_provisioned,
)
from tests.testbed.klippy import REPO

# Small Engine.IO ping settings, so a dead link shows within ~8 s
PING = 4
SIM_OPTIONS = {"ping_interval": PING, "ping_timeout": PING}


@pytest.fixture(scope="module")
def k(online_klippy, proxy):
    return online_klippy(server_url=proxy.url)


@pytest.fixture(autouse=True)
def clean_link(request, sim, proxy):
    """Each case starts and ends on a clean link with a fresh backoff."""
    sim.clear_faults()
    proxy.clear()
    yield
    sim.clear_faults()
    proxy.clear()


def assert_klippy_healthy(k):
    assert health_problems(k) == []


def assert_quiet_outage(lines):
    """At most one line per state change and reason: the retries of an
    outage are not logged one by one."""
    retries = [line.split("; retry in")[0] for line in lines
               if "; retry in" in line]
    assert len(retries) == len(set(retries)) <= 3, lines
    assert sum(line.endswith("polar_cloud: connecting") for line in lines) \
        <= 1, lines
    assert len(lines) <= 10, lines


def start_cloud_print(k, sim, job_id, moves=600, feedrate=600):
    text = demo_print(moves=moves, hotend=0, bed=0, feedrate=feedrate)
    url = sim.add_file("%s.gcode" % (job_id,), text.encode())
    since = sim.now()
    sim.push_print(k.serial, job_id, job_name="fault test", gcode_url=url)
    sim.wait_for("status", lambda d: d["status"] == 3 and d["jobId"]
                 == job_id, since=since, serial=k.serial, timeout=60)
    return since


def print_duration(k):
    return k.query("print_stats")["print_stats"]["print_duration"]


def cloud_down_until(k, sim, retries, timeout, back_timeout):
    """The cloud drops the link and refuses connections (HTTP 503) until
    the printer has scheduled `retries` retries, then comes back.  Once
    the printer is online again: the published backoff schedule, one
    attempt at the cloud per scheduled retry, one connection after.
    Returns (backoff entries, when the cloud came back, log offset)."""
    mark, log_at, t0 = k.hist.mark(), log_size(k), sim.now()
    sim.set_fault("refuse_connections", "503")
    sim.drop(k.serial, "reset")
    down = k.hist.wait_index(lambda st: st["state"] == "backoff"
                             and st["retries"] >= retries, since=mark,
                             timeout=timeout)
    t_back = sim.now()
    sim.set_fault("refuse_connections", False)
    k.hist.wait_for(lambda st: st["state"] == "online", since=down,
                    timeout=back_timeout)
    entries = k.hist.backoffs(since=mark)
    assert [r for r, _ in entries] == list(range(1, len(entries) + 1))
    assert check_schedule(entries) == [], entries
    # Each scheduled retry was one attempt at the cloud, no more
    assert len(sim.connection_attempts(since=t0, outcome="refused_503")) \
        == len(entries) - 1
    assert len(sim.connection_attempts(since=t_back, outcome="open")) == 1
    return entries, t_back, log_at


def test_cloud_down_mid_print_backs_off_and_recovers(k, sim):
    """The cloud refuses connections mid-print, then comes back."""
    fresh_session(k, sim)
    job_since = start_cloud_print(k, sim, "outage-1")
    before = print_duration(k)
    # Four scheduled retries (nominal 2, 4, 8, 16 s) while the cloud is down
    entries, t_back, log_at = cloud_down_until(k, sim, 4, 120, 120)
    assert len(entries) >= 4
    # Re-authenticated, and the job re-reported as printing
    st = sim.wait_for("status", lambda d: d["status"] == 3, since=t_back,
                      serial=k.serial, timeout=30)
    assert st["jobId"] == "outage-1"
    assert sim.live_sessions(k.serial) == 1
    # The print never noticed
    ps = k.query("print_stats")["print_stats"]
    assert ps["state"] == "printing" and ps["print_duration"] > before
    # The outage cost a handful of log lines, not one per attempt
    assert_quiet_outage(polar_lines(k, log_at))
    # Finish: a cloud cancel still works and is reported exactly once
    sim.cancel(k.serial)
    sim.wait_for("job", lambda d: d["jobId"] == "outage-1", since=job_since,
                 serial=k.serial, timeout=60)
    assert [j["state"] for j in final_reports(sim, k, "outage-1")] == [
        "canceled"]
    assert_klippy_healthy(k)
    assert sim.violations == []


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_long_outage_backs_off_to_the_cap(k, sim):
    """The cloud stays down until two retries were scheduled at
    the 120 s cap (about six minutes); quiet logs all along."""
    fresh_session(k, sim)
    entries, _t_back, log_at = cloud_down_until(k, sim, 8, 600, 240)
    at_cap = [d for r, d in entries if r >= 7]
    assert len(at_cap) >= 2 and all(59 <= d <= 180 for d in at_cap), entries
    assert_quiet_outage(polar_lines(k, log_at))
    print("outage schedule (retries, retry_in s): %s" % (entries,))
    assert_klippy_healthy(k)


def test_half_open_link_is_detected_and_replaced(k, sim):
    """The cloud goes silent with the TCP link open (no FIN, no RST)."""
    fresh_session(k, sim)
    hellos = sim.connects(k.serial)
    mark = k.hist.mark()
    assert sim.freeze(k.serial) == 1
    lost = k.hist.wait_index(lambda st: st["state"] != "online", since=mark,
                             timeout=60)
    assert k.hist.since(lost)[0]["state"] in ("backoff", "connecting")
    k.hist.wait_for(lambda st: st["state"] == "online", since=lost,
                    timeout=60)
    assert sim.connects(k.serial) == hellos + 1
    entries = k.hist.backoffs(since=mark)
    assert entries and check_schedule(entries) == [], entries
    # The frozen session times out at the cloud; one live session remains
    sim.wait_until(lambda: sim.live_sessions(k.serial) == 1, timeout=30)
    assert_klippy_healthy(k)


@pytest.mark.slow
def test_stalled_proxy_link_is_detected(k, sim, proxy):
    """Seen from the network: a middlebox stops passing anything."""
    fresh_session(k, sim)
    mark = k.hist.mark()
    link = proxy.links_since(proxy.connections()[-1])[0]
    proxy.set(stall=True)
    lost = k.hist.wait_index(lambda st: st["state"] != "online", since=mark,
                             timeout=60)
    # The printer hung up the dead link itself
    proxy.wait_until(lambda: link.client_eof)
    proxy.clear()
    k.hist.wait_for(lambda st: st["state"] == "online", since=lost,
                    timeout=60)
    assert check_schedule(k.hist.backoffs(since=mark)) == []
    sim.wait_until(lambda: sim.live_sessions(k.serial) == 1, timeout=30)
    assert_klippy_healthy(k)


@pytest.mark.parametrize("fault,value,error,waiting", [
    # A black hole also stops the cloud's pings, so python-engineio's ping
    # timeout (8 s here) may cut the link before the 15 s welcome deadline
    pytest.param("black_hole", "socket", "no welcome from Polar Cloud|"
                 "disconnected by Polar Cloud", "connecting", id="black_hole"),
    pytest.param("no_hello_response", True, "no reply to hello",
                 "authenticating", id="no_hello_response",
                 marks=pytest.mark.slow),
    pytest.param("no_welcome", True, "no welcome from Polar Cloud",
                 "connecting", id="no_welcome", marks=pytest.mark.slow),
])
def test_handshake_black_hole_is_cut_at_the_deadline(k, sim, proxy, fault,
                                                      value, error, waiting):
    """Connected but never authenticated -> cut at the deadline."""
    fresh_session(k, sim)
    sim.set_fault(fault, value)
    mark, t0 = k.hist.mark(), sim.now()
    proxy.reset_all()
    cut = k.hist.wait_index(lambda st: st["state"] == "backoff"
                            and st["retries"] >= 2, since=mark, timeout=90)
    failed = k.hist.since(cut)[0]
    assert re.fullmatch(error, failed["last_error"]), failed
    # The path: drop -> backoff -> connecting -> [authenticating ->]
    # backoff; the state that waited for the cloud lasted until the cut
    first = k.hist.wait_index(lambda st: st["state"] != "online", since=mark)
    seq = k.hist.states(first)
    assert seq[-2:] == [waiting, "backoff"] and seq[0] == "backoff", seq
    assert failed["retries"] == 2
    # Exactly one attempt reached the cloud, and the printer hung it up
    assert len(sim.connection_attempts(since=t0)) == 1
    link = proxy.links_since(t0)
    assert len(link) == 1
    proxy.wait_until(lambda: link[0].client_eof)
    if fault == "no_hello_response":
        assert len(sim.events("hello", direction="in", since=t0)) == 1
    assert not any(st["state"] == "online" for st in k.hist.since(first))
    sim.clear_faults()
    k.hist.wait_for(lambda st: st["state"] == "online", since=cut,
                    timeout=60)
    entries = k.hist.backoffs(since=mark)
    assert check_schedule(entries) == [], entries
    assert_klippy_healthy(k)
    assert sim.violations == []


def test_unresolvable_server_backs_off_and_klippy_answers(make_klippy, sim):
    """A server name that does not resolve is a normal outage."""
    k = start_provisioned(make_klippy, sim,
                          server_url="https://polar.invalid")
    hist = StateHistory.attach(k)
    st = hist.wait_for(lambda s: s["state"] == "backoff"
                       and s["retries"] >= 2, since=0, timeout=60)
    assert "cannot connect to https://polar.invalid" in st["last_error"]
    entries = hist.backoffs()
    assert check_schedule(entries) == [], entries
    # The reactor is not held: commands answer and the printer moves
    out = k.subscribe_output()
    k.gcode("POLAR_STATUS")
    line = out.wait_for(r"Polar Cloud: (backoff|connecting)")
    assert re.search(r"\(retry \d+\)", line), line
    k.gcode("G28\nG1 X50 Y50 F6000\nM400")
    assert k.query("toolhead")["toolhead"]["homed_axes"] == "xyz"
    assert_klippy_healthy(k)
    k.stop()


def test_job_report_lost_in_flight_is_sent_again_once(k, sim, proxy):
    """The final report leaves the printer into a dead link (a stalled
    middlebox, then a reset): it goes out again after the reconnect, and
    the cloud gets it exactly once."""
    fresh_session(k, sim)
    since = start_cloud_print(k, sim, "inflight-1", moves=80, feedrate=3000)
    out = k.subscribe_output()
    proxy.set(stall=True)
    out.wait_for(r"job '.*inflight-1.gcode' completed", timeout=120)
    out.close()
    assert final_reports(sim, k, "inflight-1") == []
    mark = k.hist.mark()
    proxy.reset_all()
    proxy.clear()
    lost = k.hist.wait_index(lambda st: st["state"] != "online", since=mark,
                             timeout=60)
    k.hist.wait_for(lambda st: st["state"] == "online", since=lost,
                    timeout=60)
    final = sim.wait_for("job", lambda d: d["jobId"] == "inflight-1",
                         since=since, serial=k.serial, timeout=60)
    assert final["state"] == "completed"
    # ...once: a later job's report comes, and no second one of this
    send_marker(sim, k.serial, "inflight-marker")
    assert len(final_reports(sim, k, "inflight-1")) == 1
    assert sim.violations == []


def test_slow_link_delivers_the_job_report_once(k, sim, proxy):
    """300 ms each way and 4 KB/s: status keeps flowing, the final job
    report is never dropped, klippy is not held up."""
    fresh_session(k, sim)
    hellos = sim.connects(k.serial)
    proxy.set(latency=0.3, bandwidth=4000)
    since = start_cloud_print(k, sim, "slow-1", moves=120, feedrate=3000)
    final = sim.wait_for("job", lambda d: d["jobId"] == "slow-1",
                         since=since, serial=k.serial, timeout=120)
    assert final["state"] == "completed"
    statuses = [d for d in sim.received("status", serial=k.serial,
                                        since=since)]
    assert [d["status"] for d in statuses].count(3) >= 1
    # Reports arrive in the order they were made (nothing stale queued)
    seconds = [d["printSeconds"] for d in statuses if d["status"] == 3]
    assert seconds == sorted(seconds)
    assert sim.connects(k.serial) == hellos
    assert len(final_reports(sim, k, "slow-1")) == 1
    assert_klippy_healthy(k)
    assert sim.violations == []


def test_dns_that_never_answers_leaves_klippy_alone(make_klippy, sim):
    """The resolver hangs (every lookup of the cloud's name blocks
    8 s here, then fails).  The session thread waits; klippy does not."""
    env = {"PYTHONPATH": str(REPO / "tests" / "testbed" / "dns_hang"),
           "DNS_HANG_SECONDS": "8"}
    k = start_provisioned(make_klippy, sim,
                          server_url="https://polar.hang.test", env=env)
    hist = StateHistory.attach(k)
    hist.wait_for(lambda s: s["state"] == "connecting", since=0)
    out = k.subscribe_output()
    k.gcode("POLAR_STATUS")
    out.wait_for(r"Polar Cloud: connecting")
    k.gcode("G28\nG1 X50 Y50 F6000\nM400")
    assert k.query("toolhead")["toolhead"]["homed_axes"] == "xyz"
    # A RESTART in the middle of the lookup is not held up by it
    k.restart()
    hist.wait_for(lambda s: s["state"] == "connecting",
                  since=hist.mark() - 1)
    k.gcode("POLAR_STATUS")
    out.wait_for(r"Polar Cloud: connecting")
    out.close()
    st = hist.wait_for(lambda s: s["state"] == "backoff", timeout=60)
    assert "cannot connect to https://polar.hang.test" in st["last_error"]
    assert_klippy_healthy(k)
    k.stop()
