"""What get_status, POLAR_STATUS and the webhooks show of the session:
a new dict each time, no secrets, and the documented values while not
online (status_code -1, job_id the string "0")."""
from __future__ import annotations

from klippy_extras.polar_cloud import states
from klippy_extras.polar_cloud.status_view import public_view
from tests.unit.fakes import SERIAL, make_session

FIELDS = {"state", "connected", "registered", "serial_number", "server",
          "proxy", "online_since", "last_error", "job_id", "status_code",
          "retry_in", "retries", "camera", "timelapse", "plate_clear",
          "next_print"}


def test_online_view_shows_the_last_status(tmp_path):
    s = make_session(tmp_path)
    s.reporter.last_status = {"status": 3, "jobId": "j-7"}
    view = public_view(s)
    assert set(view) == FIELDS
    assert view["connected"] and view["registered"]
    assert view["serial_number"] == SERIAL
    assert (view["status_code"], view["job_id"]) == (3, "j-7")
    assert public_view(s) is not view               # never shared


def test_offline_view_has_no_status(tmp_path):
    s = make_session(tmp_path)
    s.reporter.last_status = {"status": 3, "jobId": "j-7"}
    s.state = states.BACKOFF
    view = public_view(s)
    assert not view["connected"]
    assert (view["status_code"], view["job_id"]) == (-1, "0")


def test_no_secret_in_the_view(tmp_path):
    s = make_session(tmp_path)
    shown = repr(public_view(s))
    assert "PRIVATE KEY" not in shown and "@" not in shown
