"""The webcam as Mainsail knows it (`webcam: <name>`): the settings merged
from Moonraker's webcam list, and a real Moonraker whose webcam, added and
changed through its API, is the one snapshots come from, turned as it
says, read again on every connection; a missing Moonraker or webcam is
one clear line."""
from __future__ import annotations

import configparser
import io
import logging
import re
import threading
import time

import pytest
from PIL import Image

from klippy_extras.polar_cloud import camera, options, webcams
from tests.testbed.camera_server import CameraServer
from tests.testbed.helpers import EXTRA, health_problems, polar_cfg, register
from tests.testbed.klippy import POLL_INTERVAL
from tests.testbed.moonraker import Moonraker

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), \
    (255, 255, 255)


# Merging Moonraker's webcam into the options

def cam(**kw):
    data = {"name": "Printer Cam", "enabled": True, "service":
            "mjpegstreamer-adaptive", "stream_url": "/webcam/?action=stream",
            "snapshot_url": "/webcam/?action=snapshot",
            "flip_horizontal": False, "flip_vertical": True,
            "rotation": 270, "source": "database"}
    data.update(kw)
    return data


def test_the_webcam_fills_what_printer_cfg_leaves_open():
    opts, problems = webcams.camera_options(options.CameraOptions(), cam())
    assert problems == []
    assert opts.snapshot_url == "http://127.0.0.1/webcam/?action=snapshot"
    assert opts.stream_url == "/webcam/?action=stream"
    assert (opts.flip_horizontal, opts.flip_vertical, opts.rotation) == (
        False, True, 270)
    # Options set in printer.cfg win
    base = options.CameraOptions(snapshot_url="http://10.0.0.5:8080/snap",
                                rotation=90, explicit=frozenset(
                                    {"snapshot_url", "rotation"}))
    opts, problems = webcams.camera_options(base, cam(
        snapshot_url="http://127.0.0.1:8081/?action=snapshot"))
    assert (opts.snapshot_url, opts.rotation, opts.flip_vertical) == (
        "http://10.0.0.5:8080/snap", 90, True)


@pytest.mark.parametrize("changes,problem", [
    ({"snapshot_url": ""}, "no usable snapshot URL"),
    ({"snapshot_url": "rtsp://cam/x"}, "no usable snapshot URL"),
    ({"snapshot_url": None}, "no usable snapshot URL"),
    ({"rotation": 45}, "rotation 45 is not"),
])
def test_unusable_webcam_settings_are_named(changes, problem):
    base = options.CameraOptions()
    opts, problems = webcams.camera_options(base, cam(**changes))
    assert [p for p in problems if problem in p]
    assert opts.snapshot_url == base.snapshot_url or "snapshot" not in problem
    # a stream URL that cannot go to the cloud is left alone
    opts, _ = webcams.camera_options(base, cam(stream_url="rtsp://x/y"))
    assert opts.stream_url == base.stream_url


def test_find_and_names():
    cams = [cam(name="Printer Cam"), cam(name="nozzle"), {"name": 5}]
    assert webcams.find(cams, "Printer Cam")["name"] == "Printer Cam"
    assert webcams.find(cams, "NOZZLE")["name"] == "nozzle"
    assert webcams.find(cams, "bed") is None
    assert webcams.names(cams) == "'Printer Cam', 'nozzle'"
    assert webcams.names([]) == "none"


class FakeConfig:
    def __init__(self, **values):
        self.values = values
    def get(self, name, default=None):
        return self.values.get(name, default)
    def get_name(self):
        return "polar_cloud"
    def error(self, text):
        return configparser.Error(text)


def test_options():
    assert options.read_webcam_options(FakeConfig()) == \
        options.WebcamOptions("", "http://127.0.0.1:7125")
    assert options.read_webcam_options(FakeConfig(
        webcam=" Printer Cam ", moonraker_url="http://10.0.0.2:7125/")) == \
        options.WebcamOptions("Printer Cam", "http://10.0.0.2:7125")
    for bad in ({"moonraker_url": "ftp://x"}, {"moonraker_url": "http://u:p@x"},
                {"webcam": "a\nb"}, {"webcam": "x" * 65}):
        with pytest.raises(configparser.Error, match=next(iter(bad))):
            options.read_webcam_options(FakeConfig(**bad))


def test_lookup_failures_are_logged_once(caplog):
    """Webcams._apply, as the session thread runs it, with a fake
    session."""
    class Session:
        def __init__(self):
            self.stop_event = threading.Event()
            self.camera = camera.Camera(options.CameraOptions(enabled=True),
                                        True, self.stop_event,
                                        lambda result: None)
            self.options = type("O", (), {
                "webcam": options.WebcamOptions("c"),
                "camera": options.CameraOptions()})()
            self.console_lines = []
        def console(self, text, error=False, log=True):
            self.console_lines.append(text)
        def publish(self):
            pass
    s = Session()
    w = webcams.Webcams(s)
    w.worker.submit = lambda *a, **kw: True     # no retries started
    with caplog.at_level(logging.INFO, logger="polar_cloud"):
        for _ in range(3):
            w._apply("Moonraker does not answer", 0)
        w._apply([cam(name="c", snapshot_url="http://127.0.0.1:9/s")], 0)
        w._apply([], 0)
        w._apply([], 0)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "does not answer" in lines[0]
    assert "using Mainsail's webcam 'c': snapshots from 127.0.0.1:9" \
        in lines[1]
    assert "no webcam of that name (it has none); using the last settings" \
        in lines[2]
    assert len(s.console_lines) == 2
    assert s.camera.opts.snapshot_url == "http://127.0.0.1:9/s"


# A real Moonraker

def wait_until(predicate, timeout: float = 60.):
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        result = predicate()
        if result:
            return result
        assert time.monotonic() < deadline, "condition not met"
        pause.wait(POLL_INTERVAL)


def quadrants(data: bytes):
    img = Image.open(io.BytesIO(data))
    img.load()
    img = img.convert("RGB")
    out = []
    for fx, fy in ((.25, .25), (.75, .25), (.25, .75), (.75, .75)):
        rgb = img.getpixel((int(img.width * fx), int(img.height * fy)))
        [match] = [c for c in (RED, GREEN, BLUE, WHITE)
                   if all(abs(a - b) < 60 for a, b in zip(rgb, c))]
        out.append(match)
    return tuple(out)


@pytest.fixture(scope="module")
def cam_server():
    server = CameraServer().start()     # the quadrant picture, 64x48
    yield server
    server.stop()


@pytest.fixture(scope="module")
def setup(make_klippy, sim):
    # klippy first, as at boot: Moonraker is not there yet
    k = make_klippy("klipper", extras={"polar_cloud": EXTRA}, start=False)
    mr = Moonraker(k)
    k.extra_cfg = polar_cfg(sim.url, webcam_enabled="auto",
                                webcam="Printer Cam", moonraker_url=mr.url,
                                snapshot_interval="5")
    k.state_path = k.workdir / "polar_cloud"
    k.start()
    yield k, mr
    mr.stop()


def camera_line(k) -> str:
    """POLAR_STATUS's camera line."""
    out = k.subscribe_output()
    try:
        k.gcode("POLAR_STATUS")
        return out.wait_for(r"camera: .*")
    finally:
        out.close()


def test_without_moonraker_one_clear_line(setup):
    k, mr = setup
    line = "cannot use Mainsail's webcam 'Printer Cam': Moonraker does not" \
        " answer at %s; using the [polar_cloud] camera options" % (mr.url,)
    wait_until(lambda: line in k.log_text())
    assert k.info()["state"] == "ready"
    status = camera_line(k)
    assert "camera: snapshot_url (127.0.0.1:8080" in status
    assert "Moonraker does not answer" in status
    assert k.log_text().count(line) == 1


def test_the_webcam_added_in_moonraker_takes_the_snapshots(setup, sim,
                                                           cam_server):
    k, mr = setup
    mr.start()
    mr.post("/server/webcams/item", name="Printer Cam",
            snapshot_url=cam_server.snapshot_url,
            stream_url=cam_server.stream_url, rotation=90)
    k.serial = register(k, sim)
    wait_until(lambda: "using Mainsail's webcam 'Printer Cam': snapshots"
               " from 127.0.0.1:%d, rotation 90" % (cam_server.port,)
               in k.log_text())
    t = sim.now()
    upload = sim.wait_upload(timeout=60, since=t)
    # The quadrant picture turned 90 degrees clockwise
    assert quadrants(upload["data"]) == (BLUE, RED, WHITE, GREEN)
    status = camera_line(k)
    assert "camera: Mainsail's webcam 'Printer Cam' (127.0.0.1:%d," \
        " rotation 90)" % (cam_server.port,) in status
    assert sim.violations == []


def test_it_is_read_again_on_every_connection(setup, sim, cam_server):
    k, mr = setup
    mr.post("/server/webcams/item", name="Printer Cam", rotation=180)
    t = sim.now()
    sim.drop(k.serial)
    hello = sim.wait_for("hello", since=t, serial=k.serial, timeout=60)
    # The hello already tells the cloud: 180 degrees are both flips
    assert hello["transformImg"] == 3 and hello["camOff"] == 0
    assert re.search(r":%d/\?action=stream$" % (cam_server.port,),
                     hello["camUrl"])
    wait_until(lambda: "rotation 180" in k.log_text())
    t = sim.now()
    upload = sim.wait_upload(timeout=60, since=t)
    assert quadrants(upload["data"]) == (WHITE, BLUE, GREEN, RED)


def test_a_webcam_that_is_gone_is_one_clear_line(setup, sim, cam_server):
    k, mr = setup
    mr.request("DELETE", "/server/webcams/item?name=Printer%20Cam")
    assert mr.get("/server/webcams/list")["webcams"] == []
    line = "cannot use Mainsail's webcam 'Printer Cam': Moonraker has no" \
        " webcam of that name (it has none); using the last settings read"
    for _ in range(2):
        t = sim.now()
        sim.drop(k.serial)
        sim.wait_for("hello", since=t, serial=k.serial, timeout=60)
        wait_until(lambda: line in k.log_text())
    assert k.log_text().count(line) == 1
    # Snapshots go on with the settings last read
    t = sim.now()
    upload = sim.wait_upload(timeout=60, since=t)
    assert quadrants(upload["data"]) == (WHITE, BLUE, GREEN, RED)
    assert health_problems(k) == []
    assert sim.violations == []
