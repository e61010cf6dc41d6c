"""Timelapses of cloud prints in a real klippy: a frame per layer, the `job`
report first, status 5 while the video is made, an H.264 MP4 of the
expected length in the cloud's `timelapse` slot, and a failed upload that
costs no second `job` report and goes again after the next hello."""
from __future__ import annotations

import json
import os
import re
import threading
import time

import pytest

from klippy_extras.polar_cloud import render
from tests.testbed.camera_server import CameraServer
from tests.testbed.helpers import health_problems, log_size, register, thread_names
from tests.testbed.klippy import POLL_INTERVAL

LAYERS = 8

pytestmark = pytest.mark.skipif(not render.find_ffmpeg(),
                                reason="needs ffmpeg (apt install ffmpeg)")


def layer_print(layers: int = LAYERS, dwell_ms: int = 1200) -> str:
    """A print that reports its layers, each about dwell_ms long."""
    lines = ["; layered test print", "SET_PRINT_STATS_INFO TOTAL_LAYER=%d"
             % (layers,), "G28", "G90", "M83", "G1 Z0.3 F3000",
             "G1 X20 Y20 F12000"]
    for layer in range(1, layers + 1):
        lines.append("SET_PRINT_STATS_INFO CURRENT_LAYER=%d" % (layer,))
        lines.append("G1 Z%.2f F3000" % (0.3 * layer,))
        for i in range(4):
            lines.append("G1 X%d Y%d E0.5 F6000" % (20 + 10 * (i % 2),
                                                    20 + 10 * (i // 2)))
        lines.append("G4 P%d" % (dwell_ms,))
    lines += ["G1 Z10 F3000", "; end of layered test print", ""]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def camera():
    cam = CameraServer()
    cam.live = True             # 1280x720 with the time: frames differ
    cam.start()
    yield cam
    cam.stop()


@pytest.fixture(scope="module")
def k(polar_klippy, sim, camera):
    k = polar_klippy("klipper", webcam_enabled="auto",
                     snapshot_url=camera.snapshot_url, snapshot_interval="60",
                     timelapse="auto")
    k.serial = register(k, sim)
    return k


def send_job(sim, k, job_id: str) -> float:
    url = sim.add_file("%s.gcode" % (job_id,), layer_print().encode())
    since = sim.now()
    sim.push_print(k.serial, job_id, job_name="Layers", gcode_url=url)
    return since


def statuses(sim, k, since):
    return [ev for ev in sim.events("status", "in", k.serial, since)]


def wait_until(predicate, timeout: float = 30.) -> None:
    deadline = time.monotonic() + timeout
    stop = threading.Event()
    while not predicate():
        assert time.monotonic() < deadline, "condition not met"
        stop.wait(POLL_INTERVAL)


def uploaded_line(k, job_id: str, timeout: float = 60.) -> re.Match:
    pattern = re.compile(r"timelapse of job %s uploaded: (\d+) frames,"
                         r" ([\d.]+) s, (\d+)x(\d+), rendered in ([\d.]+) s,"
                         r" (\d+) bytes" % (re.escape(job_id),))
    found: list[re.Match] = []

    def check() -> bool:
        found[:] = list(pattern.finditer(k.log_text()))
        return bool(found)
    wait_until(check, timeout)
    return found[-1]


def test_timelapse_of_a_layered_cloud_print(k, sim):
    since = send_job(sim, k, "tl-1")
    job = sim.wait_event("job", lambda d: d["jobId"] == "tl-1", since=since,
                         serial=k.serial, timeout=120)
    assert job.data["state"] == "completed"
    upload = sim.wait_upload(timeout=120, since=since, predicate=lambda u: (
        u["type"] == "timelapse" and u["jobId"] == "tl-1"))
    req = sim.wait_for("getUrl", lambda d: d["type"] == "timelapse",
                       since=since, serial=k.serial)
    assert req == {"serialNumber": k.serial, "method": "post",
                   "type": "timelapse", "jobId": "tl-1"}
    # The form, as issued, in order; the file is an H.264 MP4
    assert upload["filename"] == "timelapse.mp4"
    assert upload["content_type"] == "video/mp4"
    form = [f for f in sim.http.forms.values() if f.type == "timelapse"
            and f.job_id == "tl-1"][-1]
    assert list(upload["fields"]) == list(form.fields)
    assert len(upload["data"]) <= form.max_size
    video = upload["video"]
    assert video["codec"] == "h264" and "mp4" in video["format"]
    # One frame per layer (and the finished print), a few seconds long
    line = uploaded_line(k, "tl-1")
    frames, seconds = int(line.group(1)), float(line.group(2))
    assert LAYERS - 1 <= frames <= LAYERS + 2, line.group(0)
    assert seconds == render.seconds_for(frames)
    assert video["frames"] == frames
    assert abs(video["duration"] - seconds) < .05, video
    assert (video["width"], video["height"]) == (1280, 720)
    assert int(line.group(6)) == len(upload["data"])
    # The job report first; 5 while the video was made; then 7, 7, 7, 0
    wait_status = sim.wait_for("status", lambda d: d["status"] == 0
                               and d["jobId"] == "0", since=job.t,
                               serial=k.serial, timeout=90)
    assert wait_status
    after = [(ev.data["status"], ev.data["jobId"])
             for ev in statuses(sim, k, job.t)]
    assert after[0] == (5, "tl-1"), after
    codes = [code for code, _ in after]
    first7 = codes.index(7)
    assert set(codes[:first7]) == {5}
    assert codes[first7:first7 + 3] == [7, 7, 7]
    assert codes[first7 + 3] == 0
    before = [ev.data["status"] for ev in statuses(sim, k, since)
              if ev.t < job.t]
    assert 5 not in before and before[-1] == 3
    # Exactly one report; the frames are gone once uploaded
    assert len([j for j in sim.received("job", serial=k.serial)
                if j["jobId"] == "tl-1"]) == 1
    wait_until(lambda: not (k.state_path / "timelapse" / "tl-1").exists())
    assert sim.violations == []


def test_failed_upload_one_job_report_and_a_retry_after_hello(k, sim):
    sim.set_fault("upload_fail", 503)
    try:
        since = send_job(sim, k, "tl-2")
        job = sim.wait_event("job", lambda d: d["jobId"] == "tl-2",
                             since=since, serial=k.serial, timeout=120)
        assert job.data["state"] == "completed"
        out = k.subscribe_output()
        # The cloud refused it: statuses go on to 7 and 0 as usual
        sim.wait_for("status", lambda d: d["status"] == 0
                     and d["jobId"] == "0", since=job.t, serial=k.serial,
                     timeout=120)
        out.close()
        wait_until(lambda: "timelapse of job tl-2 not uploaded (upload"
                   " refused: HTTP 503" in k.log_text())
        attempts = [a for a in sim.upload_attempts if a["t"] >= since
                    and a.get("filename") == "timelapse.mp4"]
        assert len(attempts) == 1 and attempts[0]["status"] == 503
        codes = [ev.data["status"] for ev in statuses(sim, k, job.t)]
        assert 5 in codes and codes.count(7) == 3
        folder = k.state_path / "timelapse" / "tl-2"
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["state"] == "completed"
        assert (folder / "timelapse.mp4").exists()
    finally:
        sim.set_fault("upload_fail", None)
    # Not tried again until the next hello: then it goes
    t = sim.now()
    sim.drop(k.serial)
    upload = sim.wait_upload(timeout=90, since=t, predicate=lambda u: (
        u["type"] == "timelapse" and u["jobId"] == "tl-2"))
    hello = sim.wait_event("hello", since=t, serial=k.serial)
    assert upload["t"] > hello.t
    assert upload["video"]["codec"] == "h264"
    # One job report, ever; no status 5 for the retry
    assert len([j for j in sim.received("job", serial=k.serial)
                if j["jobId"] == "tl-2"]) == 1
    assert 5 not in [ev.data["status"] for ev in statuses(sim, k, t)]
    wait_until(lambda: not (k.state_path / "timelapse" / "tl-2").exists())
    assert sim.violations == []
    assert os.listdir(k.state_path / "timelapse") == []


def test_restart_while_recording(k, sim):
    """A RESTART mid-print: the recording's workers and children end with
    the old session, the job ends canceled (one report), and the new
    session removes the frames."""
    url = sim.add_file("tl-3.gcode", layer_print(layers=40).encode())
    since = sim.now()
    sim.push_print(k.serial, "tl-3", job_name="Layers", gcode_url=url)
    folder = k.state_path / "timelapse" / "tl-3"
    wait_until(lambda: folder.exists() and len(
        [n for n in os.listdir(folder) if n.endswith(".jpg")]) >= 2, 90)
    log_at = log_size(k)
    k.restart()
    final = sim.wait_for("job", lambda d: d["jobId"] == "tl-3", since=since,
                         serial=k.serial, timeout=90)
    assert final["state"] == "canceled"
    wait_until(lambda: not folder.exists())
    assert len([j for j in sim.received("job", serial=k.serial)
                if j["jobId"] == "tl-3"]) == 1
    assert health_problems(k, log_at) == []
    assert sim.violations == []
    # (thread names are cut to 15 characters)
    names = thread_names(k.pid)
    assert names.count("polar_cloud-fra") <= 1, names
    assert names.count("polar_cloud-tim") == 0, names


def test_a_new_job_is_not_held_up_by_a_timelapse(k, sim):
    """Job A's timelapse waits for an upload URL that does not come; job B
    starts meanwhile; A's timelapse goes after the next hello."""
    sim.set_fault("no_geturl_response", True)
    try:
        since = send_job(sim, k, "tl-4")
        sim.wait_for("status", lambda d: d["status"] == 5
                     and d["jobId"] == "tl-4", since=since, serial=k.serial,
                     timeout=120)
        sim.wait_for("getUrl", lambda d: d["type"] == "timelapse"
                     and d["jobId"] == "tl-4", since=since, serial=k.serial)
        other = send_job(sim, k, "tl-5")
        sim.wait_for("status", lambda d: d["status"] == 3
                     and d["jobId"] == "tl-5", since=other, serial=k.serial,
                     timeout=60)
        # A is still waiting for its URL: B did not wait for it
        assert "timelapse of job tl-4 not uploaded" not in k.log_text()
        assert not [u for u in sim.uploads if u["jobId"] == "tl-4"]
    finally:
        sim.set_fault("no_geturl_response", False)
    sim.wait_upload(timeout=120, since=other, predicate=lambda u: (
        u["type"] == "timelapse" and u["jobId"] == "tl-5"))
    wait_until(lambda: "timelapse of job tl-4 not uploaded (no upload URL"
               in k.log_text(), 60)
    t = sim.now()
    sim.drop(k.serial)
    sim.wait_upload(timeout=90, since=t, predicate=lambda u: (
        u["type"] == "timelapse" and u["jobId"] == "tl-4"))
    for job_id in ("tl-4", "tl-5"):
        [report] = [j for j in sim.received("job", serial=k.serial)
                    if j["jobId"] == job_id]
        assert report["state"] == "completed"
    assert sim.violations == []
