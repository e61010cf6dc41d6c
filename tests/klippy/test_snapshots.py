"""The webcam in a real klippy: a loopback webcam, snapshots uploaded through
the cloud's upload URLs, POLAR_SNAPSHOT, and a camera outage that changes
nothing else."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from tests.testbed.camera_server import (
    noisy_jpeg,
    quadrant_image,
    to_jpeg,
)
from tests.testbed.helpers import polar_status


@pytest.fixture(scope="module")
def k(registered_klippy, camera_server):
    return registered_klippy(
        "klipper", webcam_enabled="auto",
        snapshot_url=camera_server.snapshot_url, stream_url="/webcam/",
        flip_horizontal="True", rotation="90", snapshot_interval="5",
        max_image_size="60000")


def decoded(upload):
    return Image.open(io.BytesIO(upload["data"])).convert("RGB")


def test_hello_carries_the_camera_hints(k, sim):
    hello = sim.received("hello", serial=k.serial)[-1]
    assert hello["camOff"] == 0
    assert hello["camUrl"].endswith("/webcam/")
    # flip_horizontal then 90 degrees clockwise, as the OctoPrint client
    # says it: flipV (2) then its counter-clockwise rotate90 (4); and
    # rotateImg as Polar's agent says "a rotation is set"
    assert hello["transformImg"] == 2 | 4
    assert hello["rotateImg"] == 1


def test_snapshot_is_the_view_the_hello_asks_for(k, sim, camera_server):
    """Polar shows the live stream transformed as transformImg says (the
    OctoPrint client's meaning: flips, then 90 degrees counter-clockwise);
    the uploaded snapshot must look the same."""
    hello = sim.received("hello", serial=k.serial)[-1]
    raw = quadrant_image((320, 240))
    view = raw
    if hello["transformImg"] & 1:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if hello["transformImg"] & 2:
        view = view.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if hello["transformImg"] & 4:
        view = view.transpose(Image.Transpose.ROTATE_90)
    camera_server.picture = to_jpeg(raw)
    since = sim.now()
    k.gcode("POLAR_SNAPSHOT")
    # (a scheduled snapshot of the previous picture may land first)
    upload = sim.wait_upload(since=since, timeout=60, predicate=lambda up:
                             decoded(up).size == view.size)
    got = decoded(upload)
    w, h = got.size
    for x, y in ((w // 4, h // 4), (3 * w // 4, h // 4), (w // 4, 3 * h // 4),
                 (3 * w // 4, 3 * h // 4)):
        expected = view.getpixel((x, y))
        assert all(abs(a - b) < 60 for a, b in zip(got.getpixel((x, y)),
                                                   expected)), (x, y)


def test_snapshots_are_uploaded_through_upload_urls(k, sim, camera_server):
    camera_server.picture = noisy_jpeg((1920, 1080))
    upload = sim.wait_upload(timeout=60)
    req = sim.wait_for("getUrl", serial=k.serial)
    assert req["type"] == "idle" and req["method"] == "post"
    assert upload["content_type"] == "image/jpeg"
    assert len(upload["data"]) <= 60000
    img = Image.open(io.BytesIO(upload["data"]))
    img.load()                         # a complete JPEG, not a truncated one
    assert img.width < img.height      # rotated by 90 degrees
    assert sim.violations == []


def test_klippy_never_loads_pillow(k, sim, camera_server):
    # Pillow runs in a child process: after snapshots (the one above and a
    # rotated, shrunk manual one) none of it is mapped into klippy
    out = k.subscribe_output()
    k.gcode("POLAR_SNAPSHOT")
    line = out.wait_for(r"Polar Cloud: (snapshot|no snapshot).*")
    out.close()
    assert "bytes after processing" in line and "uploaded" in line
    marks = ("/PIL/", "_imaging", "pillow.libs")
    # The check would see it: this test process has Pillow loaded
    with open("/proc/self/maps") as f:
        assert any(m in f.read() for m in marks)
    with open("/proc/%d/maps" % (k.pid,)) as f:
        maps = f.read()
    assert [m for m in marks if m in maps] == []


def test_polar_snapshot_reports_in_the_console(k, sim, camera_server):
    out = k.subscribe_output()
    k.gcode("POLAR_SNAPSHOT")
    line = out.wait_for(r"Polar Cloud: (snapshot|no snapshot).*")
    out.close()
    assert "bytes after processing" in line


def test_camera_outage_is_quiet_and_harmless(k, sim, camera_server):
    camera_server.mode = "reset"
    out = k.subscribe_output()
    k.gcode("POLAR_SNAPSHOT")
    line = out.wait_for(r"Polar Cloud: (snapshot|no snapshot).*")
    out.close()
    assert "camera" in line
    t = sim.now()
    k.gcode("M140 S35")
    sim.wait_for("status", lambda d: d["targetBed"] == 35.0, since=t,
                 serial=k.serial)
    assert polar_status(k)["state"] == "online"
    assert k.info()["state"] == "ready"
    k.gcode("M140 S0")
    camera_server.mode = "ok"
    log = k.log_text()
    assert log.count("unreachable") <= 1
