"""Timelapse parts without klippy: the frame store under its cap over a
long print, the render plan and a real ffmpeg render, the streamed S3 form,
timelapse upload slots, and the scheduler (frames per layer or per
interval, status 5, retries after hello, a day at most)."""
from __future__ import annotations

import io
import json
import logging
import os
import random
import subprocess
import threading
import time

import pytest
from PIL import Image

from klippy_extras.polar_cloud import (
    camera,
    children,
    cloud_status,
    frames,
    options,
    protocol,
    render,
    timelapse,
    uploads,
)
from tests.testbed.polarsim import PolarSim

SERIAL = "KL000001"
HAVE_FFMPEG = bool(render.find_ffmpeg())
needs_ffmpeg = pytest.mark.skipif(not HAVE_FFMPEG, reason="needs ffmpeg")


# The frame store

def add_frames(store, job_id, count, rng, low=20_000, high=60_000):
    """count frames of random sizes; the total after each one."""
    totals = []
    for _ in range(count):
        path = store.new_frame(job_id)
        with open(path, "wb") as f:
            f.write(b"\xff\xd8" + bytes(rng.randrange(low, high)))
        store.added(job_id, path)
        totals.append(store.total())
    return totals


def test_a_long_print_stays_under_the_cap(tmp_path):
    cap = 8 * 1024 * 1024
    store = frames.FrameStore(str(tmp_path), cap, threading.Event())
    store.begin("job-1")
    totals = add_frames(store, "job-1", 3000, random.Random(1))
    # 3000 frames of 40 KB on average would be 117 MB
    assert max(totals) <= cap
    names = sorted(n for n in os.listdir(tmp_path / "timelapse" / "job-1")
                   if frames.FRAME_RE.match(n))
    assert store.frame_count("job-1") == len(names) > 100
    index = [int(n[1:9]) for n in names]
    # The first and the last frame stay; the oldest are the sparsest
    assert index[0] == 1 and index[-1] == 3000
    gaps = [b - a for a, b in zip(index, index[1:])]
    quarter = len(gaps) // 4
    assert sum(gaps[:quarter]) / quarter > sum(gaps[-quarter:]) / quarter
    assert max(gaps[-quarter:]) <= max(gaps[:quarter])
    print("kept %d of 3000 frames, %.1f MB, cap %.1f MB" % (
        len(names), store.total() / 2 ** 20, cap / 2 ** 20))


def test_thinning_drops_every_other_frame_oldest_first(tmp_path):
    store = frames.FrameStore(str(tmp_path), 10 ** 9, threading.Event())
    store.begin("j")
    add_frames(store, "j", 10, random.Random(2), 1000, 1001)
    assert store.thin("j", 8 * 1002) == 2
    kept = sorted(int(n[1:9]) for n in os.listdir(tmp_path / "timelapse" / "j")
                  if frames.FRAME_RE.match(n))
    assert kept == [1, 3, 5, 6, 7, 8, 9, 10]


def test_waiting_timelapses_give_way_to_the_recording(tmp_path, caplog):
    cap = 4 * 1024 * 1024
    store = frames.FrameStore(str(tmp_path), cap, threading.Event())
    rng = random.Random(3)
    for old in ("old-1", "old-2"):
        store.begin(old)
        add_frames(store, old, 40, rng)       # 1.6 MB each
        store.update_meta(old, state="completed", completed=time.time())
    store.protected = "old-2"                 # its video is being made
    store.begin("new")
    with caplog.at_level(logging.INFO, logger="polar_cloud"):
        totals = add_frames(store, "new", 200, rng)
    assert max(totals) <= cap
    assert store.job_ids() == ["new", "old-2"]
    assert "timelapse of job old-1 dropped to make room" in caplog.text


def test_a_stopped_store_writes_nothing(tmp_path):
    stop = threading.Event()
    store = frames.FrameStore(str(tmp_path), 10 ** 9, stop)
    store.begin("j")
    stop.set()
    with pytest.raises(frames.Stopped):
        store.begin("k")
    with pytest.raises(frames.Stopped):
        store.remove("j")
    assert store.job_ids() == ["j"]
    with pytest.raises(ValueError):
        store.folder("../x")


# The render

def test_render_plan():
    assert render.seconds_for(2) == render.MIN_SECONDS
    assert render.seconds_for(90) == 6.
    assert render.seconds_for(5000) == render.MAX_SECONDS
    p = render.plan(9, (1280, 720), 20_000_000)
    assert (p.frames, p.seconds, p.out_fps) == (9, 3., 0)
    assert p.rate == 3 and (p.width, p.height) == (1280, 720)
    p = render.plan(1000, (1920, 1080), 20_000_000)
    assert p.out_fps == 30 and p.rate == 100 and p.seconds == 10.
    assert p.kbps == render.MAX_KBPS and p.height == 1080
    # A small budget: a lower bitrate and a smaller picture
    p = render.plan(1000, (1920, 1080), 1_000_000)
    assert p.kbps < 700 and p.height <= 480 and p.width % 2 == 0
    smaller = render.plan(1000, (1920, 1080), 1_000_000, smaller=1)
    assert smaller.kbps < p.kbps and smaller.height < p.height
    # Never above the camera's own size
    assert render.plan(10, (640, 480), 0).height == 480
    with pytest.raises(render.RenderError, match="too few"):
        render.plan(1, (640, 480), 0)
    args = render.command("/usr/bin/ffmpeg", p, "out.mp4")
    assert args[:2] == ["/usr/bin/ffmpeg", "-nostdin"]
    assert "libx264" in args and "+faststart" in args
    assert args[args.index("-i") + 1] == "f*.jpg"


def test_jpeg_size(tmp_path):
    path = tmp_path / "a.jpg"
    Image.new("RGB", (321, 123)).save(path, quality=80)
    assert render.jpeg_size(str(path)) == (321, 123)
    Image.new("RGB", (64, 48)).save(path, quality=80, progressive=True)
    assert render.jpeg_size(str(path)) == (64, 48)
    path.write_bytes(b"not a jpeg")
    assert render.jpeg_size(str(path)) is None
    assert render.jpeg_size(str(tmp_path / "missing.jpg")) is None


def probe(path):
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-show_entries",
         "format=duration:stream=codec_name,width,height,nb_read_frames",
         "-of", "json", path], capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    return info["format"], info["streams"][0]


def write_frames(folder, count, size=(1280, 720)):
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(4)
    for i in range(1, count + 1):
        img = Image.new("RGB", size, (rng.randrange(256), 90, 160))
        img.paste((255, 255, 255), (i * 8 % size[0], 10, i * 8 % size[0] + 40,
                                    50))
        img.save(os.path.join(folder, "f%08d.jpg" % (i,)), quality=85)


@needs_ffmpeg
@pytest.mark.parametrize("count,budget", [(9, 0), (120, 2_000_000),
                                          (400, 300_000)])
def test_render_makes_an_h264_mp4_of_the_planned_length(tmp_path, count,
                                                        budget):
    folder = str(tmp_path / "frames")
    write_frames(folder, count)
    kids = children.Children(threading.Event())
    source = render.jpeg_size(os.path.join(folder, "f%08d.jpg" % (count,)))
    result = render.render(kids, render.find_ffmpeg(), folder, count, source,
                           budget)
    fmt, stream = probe(result.path)
    assert stream["codec_name"] == "h264"
    assert abs(float(fmt["duration"]) - render.seconds_for(count)) < .01
    expected = count if result.plan.out_fps == 0 else \
        int(render.seconds_for(count) * render.MAX_FPS)
    assert int(stream["nb_read_frames"]) == expected
    assert not budget or result.size <= budget
    print("%d frames -> %.1f s, %dx%d, %d bytes (budget %d), %.2f s" % (
        count, result.plan.seconds, stream["width"], stream["height"],
        result.size, budget, result.took))


@needs_ffmpeg
def test_render_stops_with_the_session(tmp_path):
    folder = str(tmp_path / "frames")
    write_frames(folder, 3)
    stop = threading.Event()
    stop.set()
    with pytest.raises(children.ChildStopped):
        render.render(children.Children(stop), render.find_ffmpeg(), folder,
                      3, (1280, 720), 0)


def test_render_without_ffmpeg(tmp_path):
    folder = str(tmp_path / "frames")
    write_frames(folder, 3, (64, 48))
    with pytest.raises(render.RenderError, match="cannot start ffmpeg"):
        render.render(children.Children(threading.Event()),
                      str(tmp_path / "no-ffmpeg"), folder, 3, (64, 48), 0)


# Upload slots and the streamed form

def timelapse_response(**changes):
    data = {"status": "SUCCESS", "serialNumber": SERIAL, "type": "timelapse",
            "jobId": "j-9", "expires": 600, "maxSize": 20_000_000,
            "contentType": "video/mp4", "method": "post",
            "url": "https://bucket.s3.amazonaws.com/",
            "fields": {"key": "a/b.mp4", "Policy": "cG9s"}}
    data.update(changes)
    return {k: v for k, v in data.items() if v is not KeyError}


def test_timelapse_slots():
    slot = uploads.parse_url_response(timelapse_response(), SERIAL, False, 0.)
    assert (slot.type, slot.job_id, slot.content_type, slot.max_size) == (
        "timelapse", "j-9", "video/mp4", 20_000_000)
    slot = uploads.parse_url_response(
        timelapse_response(contentType=KeyError), SERIAL, False, 0.)
    assert slot.content_type == "video/mp4"
    for bad in ({"contentType": "image/jpeg"}, {"contentType": "video/webm"}):
        with pytest.raises(protocol.ProtocolError):
            uploads.parse_url_response(timelapse_response(**bad), SERIAL,
                                       False, 0.)


def test_form_body_is_a_multipart_form_of_known_length():
    stop = threading.Event()
    data = bytes(range(256)) * 1000
    body = uploads.FormBody({"key": "a/b.mp4", 'we"ird': "v"},
                            "timelapse.mp4", "video/mp4", io.BytesIO(data),
                            len(data), stop)
    raw = b"".join(iter(body))
    assert len(raw) == len(body)
    boundary = body.boundary.encode()
    assert raw.startswith(b"--" + boundary + b"\r\nContent-Disposition:"
                          b' form-data; name="key"\r\n\r\na/b.mp4\r\n')
    assert b'name="we%22ird"' in raw
    assert b'name="file"; filename="timelapse.mp4"\r\nContent-Type:' \
        b" video/mp4\r\n\r\n" + data + b"\r\n--" + boundary + b"--\r\n" in raw
    stop.set()
    body = uploads.FormBody({}, "x", "video/mp4", io.BytesIO(data), len(data),
                            stop)
    with pytest.raises(OSError):
        body.read(10)


@pytest.fixture(scope="module")
def sim():
    s = PolarSim().start()
    yield s
    s.stop()


def sim_slot(sim, size_limit=5_000_000):
    form = sim.http.issue_form(SERIAL, "timelapse", "j-1", 600, size_limit,
                               "video/mp4")
    return uploads.parse_url_response(
        {"status": "SUCCESS", "serialNumber": SERIAL, "type": "timelapse",
         "jobId": "j-1", "expires": 600, "maxSize": size_limit,
         "contentType": "video/mp4", "method": "post",
         "url": sim.url + "/upload", "fields": dict(form.fields)},
        SERIAL, True, time.monotonic())


@needs_ffmpeg
def test_a_rendered_timelapse_passes_the_simulators_checks(sim, tmp_path):
    sim.reset_records()
    folder = str(tmp_path / "frames")
    write_frames(folder, 20)
    result = render.render(children.Children(threading.Event()),
                           render.find_ffmpeg(), folder, 20, (1280, 720),
                           5_000_000)
    slot = sim_slot(sim)
    status = uploads.post_file(slot, "timelapse.mp4", result.path, True,
                               threading.Event())
    assert status == 204
    [up] = sim.uploads
    assert up["filename"] == "timelapse.mp4"
    assert up["video"]["codec"] == "h264" and up["video"]["frames"] == 20
    assert list(up["fields"]) == list(slot.fields)
    assert sim.violations == []


def test_oversized_and_refused_uploads(sim, tmp_path):
    sim.reset_records()
    path = tmp_path / "v.mp4"
    path.write_bytes(bytes(5000))
    slot = sim_slot(sim, 4096)
    with pytest.raises(uploads.UploadError, match="more than") as e:
        uploads.post_file(slot, "timelapse.mp4", str(path), True,
                          threading.Event())
    assert e.value.drop_slot and sim.upload_attempts == []
    sim.http.upload_fail = 503
    try:
        with pytest.raises(uploads.UploadError, match="HTTP 503") as e:
            uploads.post_file(sim_slot(sim), "timelapse.mp4", str(path), True,
                              threading.Event())
    finally:
        sim.http.upload_fail = None
    assert e.value.status == 503 and not e.value.drop_slot
    with pytest.raises(uploads.UploadError, match="cannot read"):
        uploads.post_file(sim_slot(sim), "timelapse.mp4",
                          str(tmp_path / "gone.mp4"), True, threading.Event())


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
