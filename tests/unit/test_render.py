"""The render plan, JPEG sizes, and real ffmpeg renders (H.264, the planned
length, stopped with the session, missing ffmpeg)."""
from __future__ import annotations

import json
import os
import subprocess
import threading

import pytest
from PIL import Image

from klippy_extras.polar_cloud import (
    children,
    render,
)
from tests.unit.fakes import needs_ffmpeg, write_frames

SERIAL = "KL000001"


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
