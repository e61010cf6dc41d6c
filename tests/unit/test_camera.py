"""Webcam snapshots (camera.py): options, hello hints, getUrlResponse,
scheduling, and real fetch/transform/shrink/upload runs against a loopback
camera and the simulator's strict S3 POST-policy endpoint (no klippy).
The image work itself: test_imaging.py."""
import configparser
import dataclasses
import io
import logging
import os
import queue
import threading
import time

import pytest
from PIL import Image

from klippy_extras.polar_cloud import camera, children, messages, protocol
from klippy_extras.polar_cloud import options as cfg
from tests.testbed.camera_server import (
    BLUE,
    GREEN,
    NO_PILLOW,
    RED,
    WHITE,
    decode,
    noisy_jpeg,
    quadrant_jpeg,
    quadrants,
)
from tests.unit.fakes import FakeConfig

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
        assert isinstance(result, camera.SnapshotResult)
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


# Options

def loopback_url_response(**kw):
    reply = {"status": "SUCCESS", "serialNumber": SERIAL, "type": "idle",
             "expires": 600, "contentType": "image/jpeg",
             "url": "http://127.0.0.1:9/upload", "fields": {"key": "k"}}
    reply.update(kw)
    return reply


def test_url_response_values_are_whole_tokens():
    parse = camera.parse_url_response
    now = time.monotonic()
    assert parse(loopback_url_response(jobId="77"), SERIAL, True,
                 now).job_id == "77"
    # Job ids are echoed verbatim (any readable id): a slot belongs to the
    # job whose id is exactly this text
    assert parse(loopback_url_response(jobId="77\n"), SERIAL, True,
                 now).job_id == "77\n"
    assert parse(loopback_url_response(jobId=77), SERIAL, True,
                 now).job_id == "77"
    with pytest.raises(protocol.ProtocolError):
        parse(loopback_url_response(contentType="image/jpeg\n"), SERIAL,
              True, now)


def test_url_response_refusal_is_one_line():
    reply = {"status": "FAILED",
             "message": "no bucket\n// Klipper state: Ready\u2028x"}
    with pytest.raises(protocol.ProtocolError) as refused:
        camera.parse_url_response(reply, SERIAL, True, time.monotonic())
    assert str(refused.value).isprintable()


def test_options_defaults():
    opts = cfg.read_camera_options(FakeConfig())
    assert opts == cfg.CameraOptions()
    assert opts.enabled is None
    assert opts.snapshot_url == "http://127.0.0.1:8080/?action=snapshot"
    assert opts.stream_url == "/webcam/?action=stream"
    assert (opts.rotation, opts.max_image_size) == (0, 150000)
    assert (opts.interval_idle, opts.interval_printing) == (60., 10.)


def test_options_values():
    opts = cfg.read_camera_options(FakeConfig(
        webcam_enabled="False", snapshot_url="https://cam.local/snap.jpg",
        stream_url="http://localhost:8081/stream", flip_horizontal="True",
        flip_vertical="true", rotation="270", max_image_size=60000,
        snapshot_interval=120, snapshot_interval_printing=5))
    assert opts == cfg.CameraOptions(
        enabled=False, snapshot_url="https://cam.local/snap.jpg",
        stream_url="http://localhost:8081/stream", flip_horizontal=True,
        flip_vertical=True, rotation=270, max_image_size=60000,
        interval_idle=120., interval_printing=5.,
        explicit=frozenset(cfg.SOURCE_OPTIONS))
    # Which of the camera's source options printer.cfg sets (a webcam from
    # Moonraker never overrides those)
    assert cfg.read_camera_options(FakeConfig(
        rotation="90")).explicit == {"rotation"}
    assert cfg.read_camera_options(FakeConfig(webcam_enabled="true")).enabled is True
    assert cfg.read_camera_options(FakeConfig(webcam_enabled="Auto")).enabled is None
    assert cfg.read_camera_options(FakeConfig(stream_url="")).stream_url == ""


@pytest.mark.parametrize("option,value", [
    ("webcam_enabled", "maybe"),
    ("snapshot_url", "ftp://127.0.0.1/snap"),
    ("snapshot_url", "/webcam/?action=snapshot"),
    ("snapshot_url", "http://127.0.0.1:8080/snap shot"),
    ("stream_url", "rtsp://cam/stream"),
    ("stream_url", "http://user:pw@cam/stream"),
    ("stream_url", "//cam/stream"),
    ("rotation", "45"),
    ("max_image_size", "5000"),
    ("snapshot_interval", "1"),
    ("snapshot_interval_printing", "4.9"),
])
def test_options_errors_name_the_option(option, value):
    with pytest.raises(configparser.Error, match=option):
        cfg.read_camera_options(FakeConfig(**{option: value}))


def test_options_with_klippy_config_wrapper():
    from klippy import configfile
    parser = configparser.RawConfigParser()
    parser.read_string("[polar_cloud]\nrotation: 90\nwebcam_enabled: True\n"
                       "max_image_size: 99999\n")
    config = configfile.ConfigWrapper(None, parser, {}, "polar_cloud")
    opts = cfg.read_camera_options(config)
    assert (opts.rotation, opts.enabled, opts.max_image_size) == (90, True, 99999)
    parser.set("polar_cloud", "rotation", "91")
    with pytest.raises(configparser.Error, match="rotation"):
        cfg.read_camera_options(config)


# hello hints

@pytest.mark.parametrize("stream,ip,expected", [
    ("/webcam/?action=stream", "192.168.1.20", "http://192.168.1.20/webcam/?action=stream"),
    ("http://127.0.0.1:8080/?action=stream", "192.168.1.20",
     "http://192.168.1.20:8080/?action=stream"),
    ("http://localhost/webcam/", "10.0.0.5", "http://10.0.0.5/webcam/"),
    ("http://[::1]:8080/s", "fd00::5", "http://[fd00::5]:8080/s"),
    ("https://cam.example.com/live", "192.168.1.20", "https://cam.example.com/live"),
    ("", "192.168.1.20", ""),
])
def test_lan_stream_url(stream, ip, expected):
    assert camera.lan_stream_url(stream, ip) == expected


def test_camera_hints():
    off = messages.CameraHints()
    ip = "10.0.0.2"
    assert camera.camera_hints(cfg.CameraOptions(enabled=False), ip, True) == off
    assert camera.camera_hints(cfg.CameraOptions(), ip, False) == off
    hints = camera.camera_hints(cfg.CameraOptions(), ip, True)
    assert hints == messages.CameraHints(
        "http://10.0.0.2/webcam/?action=stream", 0, 0, 0)
    opts = cfg.CameraOptions(enabled=True, flip_horizontal=True, rotation=90)
    hints = camera.camera_hints(opts, "10.0.0.2", False)
    assert hints.cam_off == 0
    assert hints.transform_img == messages.transform_bits(True, False, 90) == 6
    msg = messages.build_hello("S", "sig", "MAC", "KL-1", "Make", "1", ip, hints)
    assert msg["camOff"] == 0 and msg["transformImg"] == 6 and msg["rotateImg"] == 1
    flips = camera.CameraOptions(enabled=True, flip_vertical=True)
    assert camera.camera_hints(flips, ip, True).rotate_img == 0


# getUrlResponse

def good_response(**changes):
    data = {"status": "SUCCESS", "serialNumber": SERIAL, "type": "idle",
            "expires": 600, "maxSize": 200000, "contentType": "image/jpeg",
            "method": "post", "url": "https://bucket.s3.amazonaws.com/",
            "fields": {"key": "a/b.jpg", "Policy": "cG9saWN5",
                       "X-Amz-Signature": "abc"}}
    data.update(changes)
    return {k: v for k, v in data.items() if v is not KeyError}


def test_parse_url_response():
    slot = camera.parse_url_response(good_response(), SERIAL, False, 1000.)
    assert slot == camera.UploadSlot(
        "idle", "", "https://bucket.s3.amazonaws.com/",
        {"key": "a/b.jpg", "Policy": "cG9saWN5", "X-Amz-Signature": "abc"},
        1600., 200000, "image/jpeg", received_at=1000.)
    assert list(slot.fields) == ["key", "Policy", "X-Amz-Signature"]
    slot = camera.parse_url_response(
        good_response(type="printing", jobId="j-7", maxSize=KeyError,
                      contentType=KeyError, method=KeyError,
                      serialNumber=KeyError), SERIAL, False, 0.)
    assert (slot.type, slot.job_id, slot.max_size, slot.content_type) == (
        "printing", "j-7", 0, "image/jpeg")
    # An absolute expiry (epoch seconds) is turned into a monotonic one
    slot = camera.parse_url_response(good_response(expires=int(time.time()) + 300),
                                     SERIAL, False, 50.)
    assert 340. < slot.expires_at <= 351.
    slot = camera.parse_url_response(good_response(url="http://127.0.0.1:9/upload"),
                                     SERIAL, True, 0.)
    assert slot.url == "http://127.0.0.1:9/upload"


@pytest.mark.parametrize("changes,loopback_ok", [
    ({"status": "FAILED", "message": "no bucket"}, False),
    ({"status": KeyError}, False),
    ({"serialNumber": "OTHER1"}, False),
    ({"type": "timelapse"}, False),
    ({"type": KeyError}, False),
    ({"method": "put"}, False),
    ({"url": "http://bucket.s3.amazonaws.com/"}, False),
    ({"url": "http://127.0.0.1:9/upload"}, False),
    ({"url": "http://192.168.1.5/upload"}, True),
    ({"url": "https://169.254.169.254/"}, False),
    ({"url": "file:///etc/passwd"}, False),
    ({"url": 5}, False),
    ({"url": KeyError}, False),
    ({"fields": ["key", "x"]}, False),
    ({"fields": {"key": 5}}, False),
    ({"fields": {"file": "x"}}, False),
    ({"fields": {"k%d" % i: "v" for i in range(40)}}, False),
    ({"expires": -5}, False),
    ({"expires": True}, False),
    ({"expires": "600"}, False),
    ({"expires": KeyError}, False),
    ({"expires": int(time.time()) - 10}, False),
    ({"maxSize": True}, False),
    ({"maxSize": -1}, False),
    ({"maxSize": 10}, False),
    ({"maxSize": 1.5e5}, False),
    ({"contentType": "video/mp4"}, False),
])
def test_parse_url_response_rejects(changes, loopback_ok):
    with pytest.raises(protocol.ProtocolError):
        camera.parse_url_response(good_response(**changes), SERIAL, loopback_ok, 0.)


def test_parse_url_response_rejects_non_objects():
    for data in (None, "SUCCESS", [1]):
        with pytest.raises(protocol.ProtocolError):
            camera.parse_url_response(data, SERIAL, False, 0.)


# Scheduling (no I/O: nothing is started)

def slot_at(now, kind="idle", job_id="", expires=600):
    data = good_response(type=kind, expires=expires, jobId=job_id)
    return camera.parse_url_response(data, SERIAL, False, now)


def idle_camera(**kw):
    kw.setdefault("enabled", True)
    return camera.Camera(cfg.CameraOptions(**kw), False, threading.Event(),
                         print)


def test_needs_url_request_timeout_and_backoff():
    cam = idle_camera()
    t = 1000.
    assert cam.needs_url("idle", "0", t)
    cam.url_requested("idle", "0", t)
    assert not cam.needs_url("idle", "0", t + 14)
    assert cam.needs_url("idle", "0", t + 15)       # unanswered: ask again
    cam.url_requested("idle", "0", t + 15)
    assert not cam.needs_url("idle", "0", t + 15 + 29)
    assert cam.needs_url("idle", "0", t + 15 + 30)
    cam.url_requested("idle", "0", t + 45)
    assert not cam.needs_url("idle", "0", t + 45 + 59)
    assert cam.needs_url("idle", "0", t + 45 + 60)
    for _ in range(20):
        cam.url_requested("idle", "0", t)
    assert not cam.needs_url("idle", "0", t + 599)   # capped at 10 minutes
    assert cam.needs_url("idle", "0", t + 600)
    # A reply resets the backoff
    cam.set_slot(slot_at(t + 1))
    assert not cam.needs_url("idle", "0", t + 2)


def test_needs_url_refreshes_before_expiry():
    cam = idle_camera()
    t = 1000.
    cam.url_requested("idle", "0", t)
    cam.set_slot(slot_at(t + 1))                    # expires at t + 601
    assert not cam.needs_url("idle", "0", t + 500)
    assert not cam.needs_url("idle", "0", t + 570)
    assert cam.needs_url("idle", "0", t + 571)      # 30 s before expiry
    # A short-lived URL is refreshed at half its life, not every tick
    cam.set_slot(slot_at(t, expires=20))
    assert not cam.needs_url("idle", "0", t + 9)
    assert cam.needs_url("idle", "0", t + 10)


def test_needs_url_follows_the_job():
    cam = idle_camera()
    t = 1000.
    assert cam.needs_url("printing", "j1", t)
    cam.url_requested("printing", "j1", t)
    assert not cam.needs_url("printing", "j1", t + 1)
    assert cam.needs_url("printing", "j2", t + 1)   # the job changed meanwhile
    cam.set_slot(slot_at(t + 2, kind="printing"))   # the reply names no job
    assert not cam.needs_url("printing", "j1", t + 3)
    assert cam.needs_url("printing", "j2", t + 3)
    assert cam.needs_url("idle", "0", t + 3)        # kinds are separate
    assert not cam.needs_url("printing", "", t + 3)
    cam.set_slot(slot_at(t + 4, kind="printing", job_id="j2"))
    assert not cam.needs_url("printing", "j2", t + 5)
    assert cam.needs_url("printing", "j1", t + 5)   # the old slot was dropped
    cam.forget_urls()
    assert cam.needs_url("printing", "j2", t + 5)


def test_disabled_and_auto():
    off = idle_camera(enabled=False)
    assert not off.needs_url("idle", "0", 1.)
    assert not off.due("idle", 1.)
    assert not off.start("idle", "0", 1.)
    auto = idle_camera(enabled=None)
    assert auto.available() is None
    assert not auto.needs_url("idle", "0", 1.)     # first find out if there is one
    assert auto.due("idle", 1.)                    # so a probe is due


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
    monkeypatch.setattr(camera, "FETCH_READ_TIMEOUT", .5)
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
    assert camera.camera_hints(opts, "10.0.0.2", bool(run.cam.available())).cam_off == 1
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


def test_without_pillow(env, monkeypatch):
    # Pillow missing for klippy's Python: the child process says so
    sim, camera_server = env
    monkeypatch.setenv("PYTHONPATH", NO_PILLOW)
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
    monkeypatch.setattr(camera, "IMAGING_SCRIPT", script)
    monkeypatch.setattr(camera, "IMAGING_TIMEOUT", 1.)
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
    monkeypatch.setattr(camera, "IMAGING_SCRIPT", script)
    run = Runner(options(camera_server))
    run.cam.set_slot(make_slot(sim))
    result = run.run()
    assert result.error == "image processing failed (exit code 1: MemoryError: out)"
    assert not result.uploaded and sim.upload_attempts == []
    # A child that answers with something that is not a JPEG
    script, _ = fake_imaging(tmp_path, "sys.stdout.write('hello')")
    monkeypatch.setattr(camera, "IMAGING_SCRIPT", script)
    result = run.run()
    assert result.error == "image processing failed (no usable JPEG)"
    assert sim.upload_attempts == []


def test_stop_kills_the_imaging_child(env, monkeypatch, tmp_path):
    sim, camera_server = env
    script, pid_file = fake_imaging(tmp_path, "time.sleep(60)")
    monkeypatch.setattr(camera, "IMAGING_SCRIPT", script)
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
                     " Operation not permitted; image work runs at nice 19"]


def test_stop_joins_the_worker(env, monkeypatch):
    sim, camera_server = env
    monkeypatch.setattr(camera, "FETCH_READ_TIMEOUT", .5)
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
