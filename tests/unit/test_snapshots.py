"""When to take webcam snapshots (snapshots.py), with a fake session and a
camera that starts nothing: upload URLs asked for in time, the kind of
snapshot following the job, and what POLAR_SNAPSHOT says afterwards.
The camera's own work: test_camera.py and test_snapshot_worker.py."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from klippy_extras.polar_cloud import camera, protocol
from klippy_extras.polar_cloud.camera import CameraOptions, SnapshotResult
from klippy_extras.polar_cloud.snapshots import Snapshots
from tests.unit.fakes import SERIAL, FakePort


class FakeJobs:
    def __init__(self) -> None:
        self.job = None

    def view(self, snap=None):
        return self.job


@pytest.fixture
def port():
    return FakePort(camera=CameraOptions(enabled=True))


@pytest.fixture
def jobs():
    return FakeJobs()


@pytest.fixture
def snaps(port, jobs, monkeypatch):
    snaps = Snapshots(port, jobs)
    snaps.started = []

    def start(kind, job_id, now, manual=False):
        snaps.started.append((kind, job_id, manual))
        return snaps.start_ok
    snaps.start_ok = True
    monkeypatch.setattr(snaps.camera, "start", start)
    return snaps


def url_requests(port) -> list[dict]:
    return [d for e, d in port.sent if e == "getUrl"]


def url_response(**changes) -> dict:
    data = {"status": "SUCCESS", "serialNumber": SERIAL, "type": "idle",
            "expires": 600, "maxSize": 200000, "contentType": "image/jpeg",
            "method": "post", "url": "https://bucket.s3.amazonaws.com/",
            "fields": {"key": "a/b.jpg"}}
    data.update(changes)
    return data


@pytest.mark.parametrize("phase,kind", [
    ("downloading", "printing"), ("starting", "printing"),
    ("printing", "printing"), ("cancelling", "idle"), ("done", "idle")])
def test_the_kind_follows_the_job(snaps, jobs, phase, kind):
    assert snaps.kind() == ("idle", protocol.NO_JOB_ID)
    jobs.job = SimpleNamespace(job_id="j-7", phase=phase)
    assert snaps.kind() == (kind, "j-7" if kind == "printing"
                            else protocol.NO_JOB_ID)


def test_an_upload_url_is_asked_for_once(snaps, port):
    snaps.camera._available = True          # the camera answered a probe
    now = time.monotonic()
    snaps.work(now)
    snaps.work(now + 1.)
    assert url_requests(port) == [{"serialNumber": SERIAL, "method": "post",
                                   "type": "idle", "jobId": "0"}]


def test_a_url_request_the_link_refused_is_asked_again(snaps, port):
    snaps.camera._available = True
    port.emit_ok = False
    snaps.work(1000.)
    port.emit_ok = True
    snaps.work(1001.)
    assert len(url_requests(port)) == 1


def test_with_the_url_the_snapshot_is_due(snaps, port):
    snaps.camera._available = True
    now = time.monotonic()
    snaps.work(now)
    port.handlers["getUrlResponse"](url_response())
    snaps.work(now + 1.)
    assert snaps.started == [("idle", "0", False)]
    assert len(url_requests(port)) == 1


def test_a_bad_url_response_is_a_protocol_error(snaps, port):
    with pytest.raises(protocol.ProtocolError):
        port.handlers["getUrlResponse"](url_response(url="file:///x"))


def test_a_disabled_camera_asks_for_nothing(port, jobs):
    port.options.camera = CameraOptions(enabled=False)
    snaps = Snapshots(port, jobs)
    snaps.work(time.monotonic())
    snaps.probe()
    assert port.sent == [] and snaps.camera._worker is None


def test_the_probe_looks_for_a_camera(snaps):
    snaps.probe()
    assert snaps.started == [("idle", "0", False)]


def test_a_manual_snapshot_while_one_runs(snaps, port):
    snaps.manual()
    assert snaps.started == [("idle", "0", True)] and port.console_lines == []
    snaps.start_ok = False
    snaps.manual()
    assert port.console_lines == ["Polar Cloud: a snapshot is already"
                                  " running (or the session is stopping)"]


def test_results_come_back_through_the_session_thread(snaps, port):
    result = SnapshotResult(ok=True)
    snaps.camera.on_result(result)
    assert port.posted == [(snaps.done, (result,))]


@pytest.mark.parametrize("result,line", [
    (SnapshotResult(ok=True, fetched=1000, final=800, uploaded=True,
                    manual=True),
     "Polar Cloud: snapshot 1000 bytes, 800 bytes after processing;"
     " uploaded to Polar Cloud"),
    (SnapshotResult(ok=True, fetched=1000, final=1000, manual=True),
     "Polar Cloud: snapshot 1000 bytes, 1000 bytes after processing; not"
     " uploaded (no upload URL yet)"),
    (SnapshotResult(error="camera: connection failed", manual=True),
     "Polar Cloud: no snapshot; camera: connection failed"),
])
def test_a_manual_snapshot_tells_the_console(snaps, port, result, line):
    snaps.done(result)
    assert port.console_lines == [line] and snaps.last is result


def test_a_scheduled_snapshot_says_nothing(snaps, port):
    snaps.done(SnapshotResult(error="camera: connection failed"))
    assert port.console_lines == [] and snaps.last.error


def test_the_camera_gets_the_sessions_settings(snaps, port):
    assert isinstance(snaps.camera, camera.Camera)
    assert snaps.camera.stop_event is port.stop_event
    assert snaps.camera.allow_loopback_http is False
