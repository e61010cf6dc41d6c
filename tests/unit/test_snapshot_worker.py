"""One snapshot on its worker (snapshot_worker.py), started by a Camera:
real fetch/transform/shrink/upload runs against a loopback camera and the
simulator's strict S3 POST-policy endpoint (no klippy), the imaging
child's failures, and what the camera's state says afterwards.  The image
work itself: test_imaging.py."""
import dataclasses
import io
import logging
import os
import queue
import threading
import time

import pytest
from PIL import Image

from klippy_extras.polar_cloud import camera, children, imagingchild
from klippy_extras.polar_cloud import options as cfg
from klippy_extras.polar_cloud.camera_hints import camera_hints
from klippy_extras.polar_cloud.snapshot_worker import SnapshotResult
from tests.testbed.camera_server import (
    BLUE,
    GREEN,
    RED,
    WHITE,
    decode,
    noisy_jpeg,
    quadrant_jpeg,
    quadrants,
)

SERIAL = "KL000001"


# Fixtures and helpers

@pytest.fixture(scope="module")
def noisy():
    return noisy_jpeg()


@pytest.fixture
def env(sim, camera_server, caplog):
    sim.reset_records()
    sim.http.upload_fail = None
    camera_server.reset()
    caplog.set_level(logging.INFO, logger="polar_cloud")
    yield sim, camera_server
    # Never a presigned URL or a policy field in the log
    with sim.rec.lock:
        secrets = [v for form in sim.http.forms.values()
                   for k, v in form.fields.items()
                   if k in ("Policy", "X-Amz-Signature")]
    for secret in secrets:
        assert secret not in caplog.text
    assert "/upload" not in caplog.text


class Runner:
    def __init__(self, opts, allow_loopback=True):
        self.results = queue.Queue()
        self.stop_event = threading.Event()
        self.cam = camera.Camera(opts, allow_loopback, self.stop_event,
                                 self.results.put)

    def run(self, kind="idle", job_id="0", now=None, manual=False):
        now = time.monotonic() if now is None else now
        assert self.cam.start(kind, job_id, now, manual=manual)
        return self.result()

    def result(self):
        result = self.results.get(timeout=25)
        assert isinstance(result, SnapshotResult)
        return result


def options(camera_server, **kw):
    kw.setdefault("enabled", True)
    return cfg.CameraOptions(snapshot_url=camera_server.snapshot_url, **kw)


def url_response(sim, kind="idle", job_id=None, expires=600, max_size=1_000_000):
    form = sim.http.issue_form(SERIAL, kind, job_id, expires, max_size, "image/jpeg")
    return {"status": "SUCCESS", "serialNumber": SERIAL, "type": kind,
            "expires": expires, "maxSize": max_size, "contentType": "image/jpeg",
            "method": "post", "url": "%s/upload" % (sim.url,),
            "fields": dict(form.fields)}


def make_slot(sim, now=None, **kw):
    now = time.monotonic() if now is None else now
    return camera.parse_url_response(url_response(sim, **kw), SERIAL, True, now)


def camera_lines(caplog):
    return [r for r in caplog.records
            if r.name == "polar_cloud" and "camera" in r.getMessage()]


# Real runs: camera -> Pillow -> simulator upload endpoint

def check_upload(sim, slot, result):
    assert result.ok and result.uploaded, result
    assert result.http_status == 204 and result.error == ""
    assert sim.violations == []
    [up] = sim.uploads
    assert list(up["fields"]) == list(slot.fields)      # all, first, in order
    assert up["fields"] == slot.fields
    assert up["filename"] == "image.jpg"
    assert up["content_type"] == slot.content_type == "image/jpeg"
    assert len(up["data"]) == result.final
    assert result.final <= min(slot.max_size, 150000)
    return up["data"]


def test_small_snapshot_uploaded_as_is(env):
    sim, camera_server = env
    run = Runner(options(camera_server))
    slot = make_slot(sim)
    run.cam.set_slot(slot)
    result = run.run()
    data = check_upload(sim, slot, result)
    assert data == camera_server.picture                    # no needless re-encode
    assert result.fetched == result.final == len(data)
    assert quadrants(decode(data)) == (RED, GREEN, BLUE, WHITE)
    assert run.cam.available() is True


@pytest.mark.parametrize("flip_h,flip_v,rotation,expected", [
    (True, False, 0, (GREEN, RED, WHITE, BLUE)),
    (False, True, 0, (BLUE, WHITE, RED, GREEN)),
    (False, False, 90, (BLUE, RED, WHITE, GREEN)),      # clockwise
    (False, False, 180, (WHITE, BLUE, GREEN, RED)),
    (False, False, 270, (GREEN, WHITE, RED, BLUE)),
    (True, False, 90, (WHITE, GREEN, BLUE, RED)),       # flip, then rotate
    (True, True, 0, (WHITE, BLUE, GREEN, RED)),
])
def test_transforms(env, flip_h, flip_v, rotation, expected):
    sim, camera_server = env
    run = Runner(options(camera_server, flip_horizontal=flip_h, flip_vertical=flip_v,
                         rotation=rotation))
    slot = make_slot(sim)
    run.cam.set_slot(slot)
    img = decode(check_upload(sim, slot, run.run()))
    assert quadrants(img) == expected
    assert img.size == ((48, 64) if rotation in (90, 270) else (64, 48))


def test_large_noisy_frame_is_shrunk_to_fit(env, noisy):
    sim, camera_server = env
    camera_server.picture = noisy
    assert len(noisy) > 1_000_000
    run = Runner(options(camera_server))
    slot = make_slot(sim)
    run.cam.set_slot(slot)
    result = run.run()
    data = check_upload(sim, slot, result)
    assert result.fetched == len(noisy)
    assert result.final <= 150000
    img = decode(data)
    assert abs(img.width / img.height - 1920 / 1080) < .02
    assert data.endswith(b"\xff\xd9")


def test_cloud_max_size_wins_when_smaller(env, noisy):
    sim, camera_server = env
    camera_server.picture = noisy
    run = Runner(options(camera_server, rotation=90))
    slot = make_slot(sim, max_size=30000)
    run.cam.set_slot(slot)
    data = check_upload(sim, slot, run.run())
    assert len(data) <= 30000
    img = decode(data)
    assert img.height > img.width                       # rotated


def test_cannot_fit_is_skipped_not_truncated(env, noisy):
    sim, camera_server = env
    camera_server.picture = quadrant_jpeg((640, 480))
    run = Runner(options(camera_server))
    run.cam.set_slot(make_slot(sim, max_size=1024))     # too small for a picture
    result = run.run()
    assert not result.ok and not result.uploaded
    assert "cannot shrink" in result.error
    assert result.fetched == len(camera_server.picture)
    camera_server.picture = noisy
    result = run.run()
    assert "cannot shrink" in result.error and not result.uploaded
    assert sim.upload_attempts == []
    assert run.cam.available() is True                  # the camera is fine


@pytest.mark.parametrize("mode,picture,error", [
    ("truncated", None, "camera: "),
    ("ok", "half", "broken JPEG"),
    ("ok", "tail", "broken JPEG"),
    ("html", None, "not a JPEG"),
    ("ok", "png", "not a JPEG"),
    ("404", None, "HTTP 404"),
    ("reset", None, "connection failed"),
    ("mjpeg", None, "video stream"),
])
def test_bad_camera_answers(env, mode, picture, error):
    sim, camera_server = env
    good = quadrant_jpeg((640, 480))
    if picture == "half":
        camera_server.picture = good[:len(good) // 2]
    elif picture == "tail":
        camera_server.picture = good[:-200]
    elif picture == "png":
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, "PNG")
        camera_server.picture = buf.getvalue()
    camera_server.mode = mode
    run = Runner(options(camera_server))
    run.cam.set_slot(make_slot(sim))
    result = run.run()
    assert not result.ok and not result.uploaded
    assert error in result.error
    assert sim.upload_attempts == []
    assert run.cam.available() is False


def test_endless_snapshot_is_capped(env):
    sim, camera_server = env
    camera_server.mode = "endless"
    run = Runner(options(camera_server))
    run.cam.set_slot(make_slot(sim))
    result = run.run()
    assert "larger than 10 MB" in result.error
    assert result.fetched == 0 and sim.upload_attempts == []


def test_slow_camera_still_works(env):
    sim, camera_server = env
    camera_server.mode = "slow"
    run = Runner(options(camera_server))
    slot = make_slot(sim)
    run.cam.set_slot(slot)
    data = check_upload(sim, slot, run.run())
    assert data == camera_server.picture


def test_stalled_camera_times_out_one_worker_at_a_time(env, monkeypatch):
    sim, camera_server = env
    monkeypatch.setattr(imagingchild, "FETCH_READ_TIMEOUT", .5)
    camera_server.mode = "stall"
    run = Runner(options(camera_server))
    run.cam.set_slot(make_slot(sim))
    t = time.monotonic()
    assert run.cam.start("idle", "0", t)
    assert not run.cam.start("idle", "0", t + 100)      # busy
    assert not run.cam.due("idle", t + 100)
    result = run.result()
    assert "read timeout" in result.error
    assert run.cam.due("idle", t + 100)


def test_expired_slot_is_never_used(env):
    sim, camera_server = env
    run = Runner(options(camera_server))
    slot = make_slot(sim)
    run.cam.set_slot(dataclasses.replace(slot, expires_at=time.monotonic() - 1))
    result = run.run()
    assert result.error == "upload URL expired" and not result.uploaded
    assert result.fetched > 0                           # still a camera probe
    assert run.cam.needs_url("idle", "0", time.monotonic())
    # Expiring between start() and the upload: the worker checks again
    late = dataclasses.replace(slot, expires_at=time.monotonic() + 1)
    run.cam.set_slot(late)
    result = run.run(now=late.expires_at - 100)
    assert result.error == "upload URL expired"
    assert sim.upload_attempts == []
    assert run.cam.needs_url("idle", "0", time.monotonic())


def test_printing_slot_only_for_its_job(env):
    sim, camera_server = env
    run = Runner(options(camera_server))
    run.cam.url_requested("printing", "j1", time.monotonic())
    slot = make_slot(sim, kind="printing", job_id="j1")
    run.cam.set_slot(slot)
    result = run.run("printing", "j2")
    assert result.error == "no upload URL yet" and sim.upload_attempts == []
    result = run.run("printing", "j1")
    check_upload(sim, slot, result)
    assert sim.uploads[0]["type"] == "printing" and sim.uploads[0]["jobId"] == "j1"


def test_upload_refused(env):
    sim, camera_server = env
    run = Runner(options(camera_server))
    slot = make_slot(sim)
    run.cam.set_slot(slot)
    sim.http.upload_fail = 500
    result = run.run()
    assert not result.ok and result.http_status == 500
    assert result.error == "upload refused: HTTP 500 InternalError"
    assert not run.cam.needs_url("idle", "0", time.monotonic())   # keeps the URL
    sim.http.upload_fail = None
    # A tampered policy: the bucket says 403, the URL is dropped
    bad = dataclasses.replace(slot, fields=dict(slot.fields, Policy="eyJ9"))
    run.cam.set_slot(bad)
    result = run.run()
    assert result.http_status == 403 and "AccessDenied" in result.error
    assert run.cam.needs_url("idle", "0", time.monotonic())
    sim.reset_records()                                 # the 403 was a violation


def test_upload_endpoint_down(env):
    sim, camera_server = env
    run = Runner(options(camera_server))
    slot = make_slot(sim)
    run.cam.set_slot(dataclasses.replace(slot, url="http://127.0.0.1:9/upload"))
    result = run.run()
    assert result.error == "upload failed: connection failed"


def test_outage_logs_state_changes_and_backs_off(env, caplog):
    sim, camera_server = env
    run = Runner(options(camera_server, interval_idle=60.))
    run.cam.set_slot(make_slot(sim))
    t = time.monotonic()
    assert run.run(now=t).uploaded
    camera_server.mode = "reset"
    for i in range(1, 4):
        assert run.cam.due("idle", t + 60 * i)
        assert run.run(now=t + 60 * i).error == "camera: connection failed"
        assert run.cam.available() is False
    last = t + 180
    assert not run.cam.due("idle", last + 60)           # backing off
    assert not run.cam.due("idle", last + 299)
    assert run.cam.due("idle", last + 300)
    camera_server.mode = "ok"
    assert run.run(now=last + 300).uploaded
    assert run.cam.due("idle", last + 361)              # back to normal
    lines = [r.getMessage() for r in camera_lines(caplog)]
    assert len(lines) == 3, lines
    assert "answers" in lines[0]
    assert "unreachable: connection failed" in lines[1]
    assert "reachable again" in lines[2]
    assert [r.levelno for r in camera_lines(caplog)][1] == logging.WARNING


def test_auto_mode_without_camera(env, caplog):
    sim, camera_server = env
    opts = cfg.CameraOptions(snapshot_url="http://127.0.0.1:9/?action=snapshot")
    run = Runner(opts)
    t = time.monotonic()
    assert run.cam.due("idle", t)
    result = run.run(now=t)
    assert result.error == "camera: connection failed"
    assert run.cam.available() is False
    assert not run.cam.needs_url("idle", "0", t)        # no URLs for no camera
    assert camera_hints(opts, "10.0.0.2", bool(run.cam.available())).cam_off == 1
    [line] = camera_lines(caplog)
    assert line.levelno == logging.INFO
    assert "no camera at 127.0.0.1:9" in line.getMessage()


def test_auto_mode_finds_camera(env):
    sim, camera_server = env
    run = Runner(options(camera_server, enabled=None))
    t = time.monotonic()
    result = run.run(now=t)                             # the probe
    assert result.error == "no upload URL yet" and result.fetched > 0
    assert run.cam.available() is True
    assert run.cam.needs_url("idle", "0", t)
    assert not run.cam.due("idle", t + 3600)            # nothing until a URL
    run.cam.url_requested("idle", "0", t)
    run.cam.set_slot(make_slot(sim))
    # (t + 60) - t may round below 60: a second later is due whatever t is
    assert run.cam.due("idle", t + 61)
    assert run.run(now=t + 61).uploaded


def test_manual_snapshot_without_url(env, noisy):
    sim, camera_server = env
    camera_server.picture = noisy
    run = Runner(options(camera_server, enabled=False, max_image_size=50000))
    result = run.run(manual=True)
    assert result.ok and not result.uploaded and result.manual
    assert result.fetched == len(noisy) and 0 < result.final <= 50000
    assert sim.upload_attempts == []


def test_without_pillow(env, monkeypatch, tmp_path):
    # Pillow missing for klippy's Python: the child process says so
    sim, camera_server = env
    monkeypatch.setattr(imagingchild, "IMAGING_SCRIPT",
                        without_pillow(tmp_path))
    run = Runner(options(camera_server))
    slot = make_slot(sim)
    run.cam.set_slot(slot)
    data = check_upload(sim, slot, run.run())           # fits, no transform
    assert data == camera_server.picture
    sim.reset_records()
    run = Runner(options(camera_server, flip_vertical=True))
    run.cam.set_slot(make_slot(sim))
    result = run.run()
    assert result.error == ("Pillow is not installed (needed to shrink or rotate"
                            " the snapshot)") and not result.uploaded
    camera_server.picture = quadrant_jpeg()[:-2]
    run = Runner(options(camera_server))
    run.cam.set_slot(make_slot(sim))
    assert "incomplete JPEG" in run.run().error
    assert sim.upload_attempts == []


def without_pillow(tmp_path) -> str:
    """imaging.py run where Pillow cannot be imported."""
    script = tmp_path / "imaging_without_pillow.py"
    script.write_text("import runpy, sys\n"
                      "sys.modules['PIL'] = None\n"
                      "runpy.run_path(%r, run_name='__main__')\n"
                      % (imagingchild.imaging.SCRIPT,))
    return str(script)


def fake_imaging(tmp_path, body):
    """A stand-in for imaging.py that writes its pid to a file first."""
    script = tmp_path / "fake_imaging.py"
    pid_file = tmp_path / "pid"
    script.write_text("import os, sys, time\n"
                      "open(%r, 'w').write(str(os.getpid()))\n%s\n"
                      % (str(pid_file), body))
    return str(script), pid_file


def gone(pid_file):
    """Has the fake child ended and been reaped?"""
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_imaging_timeout_kills_the_child(env, monkeypatch, tmp_path):
    sim, camera_server = env
    script, pid_file = fake_imaging(tmp_path, "time.sleep(60)")
    monkeypatch.setattr(imagingchild, "IMAGING_SCRIPT", script)
    monkeypatch.setattr(imagingchild, "IMAGING_TIMEOUT", 1.)
    run = Runner(options(camera_server))
    run.cam.set_slot(make_slot(sim))
    result = run.run()
    assert result.error == "image processing took longer than 1 s; skipped"
    assert not result.uploaded and sim.upload_attempts == []
    assert gone(pid_file)


def test_imaging_child_failure(env, monkeypatch, tmp_path):
    sim, camera_server = env
    script, _ = fake_imaging(tmp_path, "sys.stderr.write('Traceback\\n"
                             "MemoryError: out\\n'); sys.exit(1)")
    monkeypatch.setattr(imagingchild, "IMAGING_SCRIPT", script)
    run = Runner(options(camera_server))
    run.cam.set_slot(make_slot(sim))
    result = run.run()
    assert result.error == "image processing failed (exit code 1: MemoryError: out)"
    assert not result.uploaded and sim.upload_attempts == []
    # A child that answers with something that is not a JPEG
    script, _ = fake_imaging(tmp_path, "sys.stdout.write('hello')")
    monkeypatch.setattr(imagingchild, "IMAGING_SCRIPT", script)
    result = run.run()
    assert result.error == "image processing failed (no usable JPEG)"
    assert sim.upload_attempts == []


def test_stop_kills_the_imaging_child(env, monkeypatch, tmp_path):
    sim, camera_server = env
    script, pid_file = fake_imaging(tmp_path, "time.sleep(60)")
    monkeypatch.setattr(imagingchild, "IMAGING_SCRIPT", script)
    run = Runner(options(camera_server))
    run.cam.set_slot(make_slot(sim))
    assert run.cam.start("idle", "0", time.monotonic())
    deadline = time.monotonic() + 20
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline
        time.sleep(.02)
    run.stop_event.set()
    run.cam.stop(10.)
    # Ended without waiting for the child's 60 s
    assert not run.cam._worker.is_alive()
    result = run.result()
    assert result.error == "camera: stopped" and sim.upload_attempts == []
    assert gone(pid_file)


def test_without_sched_idle_the_child_still_runs_at_nice_19(
        env, monkeypatch, tmp_path, caplog):
    """Where chrt cannot set SCHED_IDLE (a container), the snapshot still
    goes, once logged, with the child lowering its own priority."""
    sim, camera_server = env
    chrt = tmp_path / "chrt"
    chrt.write_text("#!/bin/sh\necho \"chrt: failed to set pid 0's policy:"
                    " Operation not permitted\" >&2\nexit 1\n")
    chrt.chmod(0o755)
    monkeypatch.setattr(children, "_idle_prefix", lambda: [str(chrt)])
    monkeypatch.setattr(children, "_use_chrt", True)
    host = children.HelperHost(children.HELPERS)
    monkeypatch.setattr(children, "HOST", host)
    run = Runner(options(camera_server, flip_vertical=True))
    slot = make_slot(sim)
    run.cam.set_slot(slot)
    with caplog.at_level(logging.INFO, logger="polar_cloud"):
        result = run.run()
        assert result.uploaded, result
        run.cam.set_slot(make_slot(sim))
        assert run.run().uploaded
    assert children._use_chrt is False
    lines = [r.getMessage() for r in caplog.records if "chrt" in r.getMessage()]
    assert lines == ["polar_cloud: chrt: failed to set pid 0's policy:"
                     " Operation not permitted; helpers run at nice 19"]
    host.stop()


def test_stop_joins_the_worker(env, monkeypatch):
    sim, camera_server = env
    monkeypatch.setattr(imagingchild, "FETCH_READ_TIMEOUT", .5)
    camera_server.mode = "slow"
    camera_server.slow_pause = .05
    run = Runner(options(camera_server))
    run.cam.set_slot(make_slot(sim))
    assert run.cam.start("idle", "0", time.monotonic())
    run.stop_event.set()
    run.cam.stop(10.)
    result = run.result()
    assert result.error == "camera: stopped" and sim.upload_attempts == []
    assert run.cam.available() is None      # stopping says nothing about it
    assert not run.cam.start("idle", "0", time.monotonic())
