"""Webcam snapshots' schedule (camera.py): options, getUrlResponse and
scheduling, without I/O.  One snapshot's work: test_snapshot_worker.py."""
import configparser
import threading
import time

import pytest

from klippy_extras.polar_cloud import camera, protocol
from klippy_extras.polar_cloud import options as cfg
from tests.unit.fakes import FakeConfig

SERIAL = "KL000001"


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
