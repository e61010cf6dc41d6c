"""What the printer tells the cloud unasked (reporting.py): a status when
something the cloud shows changed, else once per interval (shorter while
active), at once when asked; the running version once a day."""
from __future__ import annotations

from klippy_extras.polar_cloud import protocol
from klippy_extras.polar_cloud.reporting import VERSION_INTERVAL, Reporter
from tests.unit.fakes import SERIAL, FakePort, snapshot


class FakeJobs:
    def __init__(self) -> None:
        self.sent_codes: list[int] = []

    def view(self, snap=None):
        return None

    def slicer_estimate(self, snap) -> float:
        return 0.

    def status_sent(self, code: int) -> None:
        self.sent_codes.append(code)


def reporter(**snap) -> tuple[FakePort, FakeJobs, Reporter]:
    port, jobs = FakePort(), FakeJobs()
    port.sample = snapshot(**snap)
    return port, jobs, Reporter(port, jobs)


def started(**snap) -> tuple[FakePort, FakeJobs, Reporter]:
    """A reporter whose session came online at t=1000 and worked once."""
    port, jobs, r = reporter(**snap)
    r.online(1000.)
    r.work(1000.)
    return port, jobs, r


def statuses(port: FakePort) -> list[dict]:
    return [d for e, d in port.sent if e == "status"]


def test_a_new_session_sends_the_version_and_a_status():
    port, jobs, r = reporter()
    r.online(1000.)
    r.work(1000.)
    assert [e for e, _ in port.sent] == ["setVersion", "status"]
    assert port.sent[0][1] == {"serialNumber": SERIAL,
                               "runningVersion": "0.0"}
    [status] = statuses(port)
    assert status["serialNumber"] == SERIAL and status["status"] == 0
    assert jobs.sent_codes == [0] and r.count == 1
    assert r.last_status == status and port.publishes == 1


def test_an_unchanged_idle_status_goes_once_per_status_interval():
    port, _, r = started()
    for t in range(1005, 1060, 5):
        r.work(float(t))
    assert len(statuses(port)) == 1
    r.work(1060.)
    assert len(statuses(port)) == 2


def test_a_change_the_cloud_shows_goes_at_once():
    port, _, r = started()
    port.sample = snapshot(heaters={"tool0": (20., 200.), "bed": (20., 0.)})
    r.work(1001.)
    assert [s["targetTool0"] for s in statuses(port)] == [0., 200.]


def test_an_active_printer_reports_every_active_interval():
    port, _, r = started(heaters={"tool0": (150., 200.), "bed": (20., 0.)})
    r.work(1009.)
    assert len(statuses(port)) == 1
    r.work(1010.)
    assert len(statuses(port)) == 2


def test_status_now_sends_even_an_unchanged_status():
    port, _, r = started()
    r.status_now()
    r.work(1001.)
    r.work(1002.)
    assert len(statuses(port)) == 2


def test_a_status_the_link_refused_goes_out_at_the_next_chance():
    port, jobs, r = reporter()
    r.online(1000.)
    port.emit_ok = False
    r.work(1000.)
    assert statuses(port) == [] and jobs.sent_codes == [] and r.count == 0
    port.emit_ok = True
    r.work(1001.)
    assert len(statuses(port)) == 1 and jobs.sent_codes == [0]


def test_no_sample_no_status():
    port, _, r = reporter()
    port.sample = None
    r.online(1000.)
    r.work(1000.)
    assert statuses(port) == [] and r.status_message() is None


def test_shutdown_is_reported_with_klippys_words():
    port, _, r = started(klippy_state="shutdown",
                         state_message="Timer too close")
    [status] = statuses(port)
    assert status["status"] == protocol.ERROR
    assert "Timer too close" in status["progressDetail"]


def test_the_version_goes_again_after_a_day():
    port, _, r = reporter()
    r.online(1000.)
    r.work(1000. + VERSION_INTERVAL)
    r.work(1000. + VERSION_INTERVAL + 1.)
    assert [e for e, _ in port.sent].count("setVersion") == 2
