"""The timelapse scheduler on the session thread, with the work recorded
instead of run: frames per layer or per interval, status 5, retries after
hello, a day at most."""
from __future__ import annotations

import logging
import threading
import time

import pytest

from klippy_extras.polar_cloud import (
    camera,
    cloud_status,
    options,
    protocol,
    render,
    timelapse,
    uploads,
)
from tests.unit.fakes import timelapse_response

SERIAL = "KL000001"


# The scheduler (session thread), with the work recorded instead of run

class FakeWorker:
    def __init__(self):
        self.tasks = []
    def submit(self, fn, *args, done=None):
        self.tasks.append((fn, args, done))
        return True
    def busy(self):
        return False
    def join(self, timeout):
        pass
    def names(self):
        return [getattr(fn, "__name__", getattr(getattr(fn, "func", None),
                                                "__name__", "?"))
                for fn, _a, _d in self.tasks]
    def take(self, name):
        for task in self.tasks:
            fn = task[0]
            if getattr(fn, "__name__", "") == name:
                self.tasks.remove(task)
                return task
        raise AssertionError("no %s in %s" % (name, self.names()))


class FakeJobs:
    def __init__(self):
        self.job = None
    def view(self, snap=None):
        return self.job


class FakeInbox:
    def __init__(self):
        self.calls = []
    def put_local(self, fn, *args):
        self.calls.append((fn, args))


class FakeSession:
    def __init__(self, state_path, **opts):
        cam = dict(enabled=True, snapshot_url="http://127.0.0.1:9/snap")
        self.options = type("O", (), {
            "state_path": state_path, "ca_file": "",
            "timelapse": options.TimelapseOptions(**opts),
            "camera": options.CameraOptions(**cam)})()
        self.stop_event = threading.Event()
        self.camera = camera.Camera(self.options.camera, True,
                                    self.stop_event, print)
        self.camera._available = True
        self.jobs = FakeJobs()
        self.inbox = FakeInbox()
        self.emits = []
        self.online = True
        self.rlogged = []
    def post(self, fn, *args):
        self.inbox.put_local(fn, *args)
    def emit(self, event, data, callback=None):
        self.emits.append((event, data))
        return True
    def serial(self):
        return SERIAL
    def is_online(self):
        return self.online
    def loopback_test_server(self):
        return True
    def rlog(self, key, msg, *args, level=logging.INFO):
        self.rlogged.append(msg % args)
        return True


@pytest.fixture
def tl(tmp_path, monkeypatch):
    monkeypatch.setattr(render, "find_ffmpeg", lambda: "/usr/bin/ffmpeg")
    s = FakeSession(str(tmp_path))
    t = timelapse.Timelapse(s)
    t.frames, t.post = FakeWorker(), FakeWorker()
    return t


def printing(job_id="j1", layer=None, duration=5., state="printing"):
    return cloud_status.JobView(job_id, "printing", job_id + ".gcode"), {
        "print_state": state, "filename": job_id + ".gcode",
        "print_duration": duration, "current_layer": layer}


def captures(t):
    return t.frames.names().count("capture")


def test_a_frame_at_each_layer_change(tl):
    job, snap = printing(layer=None, duration=0.)
    tl.session.jobs.job = job
    tl.tick(100., snap)                 # heating: the folder, no frame
    assert tl.frames.names() == ["begin"] and captures(tl) == 0
    for now, layer in ((101., 1), (102., 1), (103., 2), (200., 2), (201., 3)):
        tl.tick(now, printing(layer=layer)[1])
    assert captures(tl) == 3
    tl.tick(202., printing(layer=4, state="paused")[1])
    assert captures(tl) == 3            # paused: none
    tl.tick(203., printing(layer=4)[1])
    assert captures(tl) == 4


def test_without_layers_a_frame_per_interval(tl):
    job, snap = printing()
    tl.session.jobs.job = job
    for now in (100., 105., 109.9, 110., 115., 120.5):
        tl.tick(now, snap)
    assert captures(tl) == 3            # interval_printing: 10 s


def test_a_completed_job_reports_5_then_uploads(tl):
    job, snap = printing(layer=1)
    tl.session.jobs.job = job
    tl.tick(100., snap)
    done = cloud_status.JobView("j1", "done", "j1.gcode", protocol.COMPLETE)
    tl.session.jobs.job = done
    tl.tick(101., snap)
    assert tl.status_code(protocol.COMPLETE, done) == protocol.POSTPROCESSING
    assert tl.status_code(protocol.IDLE, done) == protocol.IDLE
    other = cloud_status.JobView("j2", "done", "j2.gcode", protocol.COMPLETE)
    assert tl.status_code(protocol.COMPLETE, other) == protocol.COMPLETE
    assert tl.frames.names()[-2:] == ["update_meta", "capture"]  # last frame
    tl.tick(102., snap)
    tl.online_work(102.)
    assert tl.session.emits == [("getUrl", {
        "serialNumber": SERIAL, "method": "post", "type": "timelapse",
        "jobId": "j1"})]
    tl.online_work(103.)
    assert len(tl.session.emits) == 1   # asked once
    tl.set_slot(uploads.parse_url_response(
        timelapse_response(jobId=KeyError, url="http://127.0.0.1:9/up"),
        SERIAL, True, time.monotonic()))
    _fn, args, done_cb = tl.post.take("_render")
    assert args == ("j1", 20_000_000)
    p = render.plan(9, (1280, 720), 20_000_000)
    done_cb(("/x/timelapse.mp4", render.Rendered("/x/.r.mp4", 1000, p, .5)))
    fn, args = tl.session.inbox.calls.pop()
    fn(*args)
    _fn, args, done_cb = tl.post.take("_upload")
    assert args[:2] == ("j1", "/x/timelapse.mp4")
    assert tl.status_code(protocol.COMPLETE, done) == protocol.POSTPROCESSING
    done_cb(204)
    fn, args = tl.session.inbox.calls.pop()
    fn(*args)
    assert tl.current is None and tl.post.names() == ["remove"]
    assert tl.status_code(protocol.COMPLETE, done) == protocol.COMPLETE


def test_a_failed_upload_waits_for_the_next_hello(tl):
    tl.session.jobs.job = printing()[0]
    tl.tick(100., printing()[1])
    tl.session.jobs.job = cloud_status.JobView("j1", "done", "j1.gcode",
                                           protocol.COMPLETE)
    tl.tick(101., None)
    tl.session.online = False           # the link is down as it ends
    tl.tick(102., None)
    assert tl.current is None and "j1" in tl.waiting
    assert "offline" in tl.session.rlogged[-1]
    assert tl.status_code(protocol.COMPLETE, tl.session.jobs.job) == \
        protocol.COMPLETE
    tl.session.online = True
    tl.tick(103., None)
    assert tl.session.emits == []       # not before a hello
    tl.hello_done()
    tl.tick(104., None)
    tl.online_work(104.)
    assert [e for e, _d in tl.session.emits] == ["getUrl"]
    # No answer: given up for this connection
    tl.tick(104. + timelapse.URL_WAIT + 1., None)
    assert tl.current is None and "j1" in tl.waiting
    # A day later it is deleted
    tl.waiting["j1"] = time.time() - timelapse.RETRY_FOR - 1.
    tl.hello_done()
    assert tl.post.names()[-1] == "remove" and not tl.waiting


def test_a_cancelled_job_leaves_no_frames(tl):
    tl.session.jobs.job = printing()[0]
    tl.tick(100., printing()[1])
    tl.session.jobs.job = cloud_status.JobView("j1", "done", "j1.gcode",
                                           protocol.IDLE)
    tl.tick(101., None)
    assert tl.frames.names()[-1] == "remove" and tl.current is None
    tl.session.jobs.job = None
    tl.tick(102., None)
    assert tl.frames.names()[-1] == "remove"


def test_auto_needs_an_answering_camera(tl):
    tl.session.camera._available = False
    tl.session.jobs.job = printing()[0]
    tl.tick(100., printing()[1])
    assert tl.frames.tasks == [] and "auto" in tl.describe()


def test_without_ffmpeg_auto_says_why_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(render, "find_ffmpeg", lambda: "")
    t = timelapse.Timelapse(FakeSession(str(tmp_path)))
    t.frames = FakeWorker()
    with caplog.at_level(logging.INFO, logger="polar_cloud"):
        for now in (1., 2., 3.):
            t.tick(now, printing()[1])
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["polar_cloud: timelapses are off: ffmpeg is not"
                     " installed (./install.sh --timelapse, or: sudo apt"
                     " install ffmpeg)"]
    assert t.describe() == "off (ffmpeg is not installed)"


def test_a_bug_stays_inside(tl, caplog):
    tl.session.jobs.view = None         # not callable: every tick fails
    with caplog.at_level(logging.INFO, logger="polar_cloud"):
        tl.tick(1., None)
        tl.tick(2., None)
    assert caplog.text.count("Timelapse.tick failed") == 1
