"""imaging.py as a child process, from klippy's side (imagingchild.py):
the request reaches the child's stdin whole, and its answer is read back
as exit code, JPEG, last error line and bytes fetched."""
from __future__ import annotations

import sys
import threading

import pytest

from klippy_extras.polar_cloud import children, imaging, imagingchild
from klippy_extras.polar_cloud import options as cfg


def child(tmp_path, monkeypatch, body: str) -> children.Children:
    script = tmp_path / "fake_imaging.py"
    script.write_text("import sys\n" + body + "\n")
    monkeypatch.setattr(imagingchild, "IMAGING_SCRIPT", str(script))
    return children.Children(threading.Event())


def test_the_answer_is_read_back(tmp_path, monkeypatch):
    kids = child(tmp_path, monkeypatch,
                 "data = sys.stdin.buffer.read()\n"
                 "sys.stdout.buffer.write(data[::-1])\n"
                 "sys.stderr.write('fetched 1234\\nfirst\\nthe last\\n')\n"
                 "sys.exit(4)")
    request = b"x" * 300_000 + b"y"
    code, out, err, fetched = imagingchild.run_imaging(kids, request)
    assert (code, out, err, fetched) == (4, request[::-1], "the last", 1234)


def test_without_a_fetched_line(tmp_path, monkeypatch):
    kids = child(tmp_path, monkeypatch, "sys.stderr.write('fetched 9\\n')")
    assert imagingchild.run_imaging(kids, b"{}\n") == (0, b"", "", 9)


def test_without_an_interpreter(tmp_path, monkeypatch):
    kids = child(tmp_path, monkeypatch, "")
    monkeypatch.setattr(sys, "executable", "")
    with pytest.raises(children.ChildError):
        imagingchild.run_imaging(kids, b"{}\n")


def test_fetch_spec_takes_the_camera_options():
    opts = cfg.CameraOptions(snapshot_url="http://127.0.0.1:8080/snap")
    spec = imagingchild.fetch_spec(opts)
    assert (spec.url, spec.connect_timeout, spec.read_timeout, spec.deadline,
            spec.max_bytes, spec.proxy) == (
        "http://127.0.0.1:8080/snap", imagingchild.FETCH_CONNECT_TIMEOUT,
        imagingchild.FETCH_READ_TIMEOUT, imagingchild.FETCH_DEADLINE,
        cfg.MAX_FETCH, "")


def test_the_request_is_the_header_imaging_reads():
    opts = cfg.CameraOptions(flip_vertical=True, rotation=270)
    spec = imaging.Fetch("http://127.0.0.1:8080/snap", 1., 2., 3., 4)
    raw = imagingchild.request(5000, opts, spec, out="/tmp/f.jpg")
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    limit, transform, data, fetch = imaging.parse_request(raw)
    assert (limit, transform, data, fetch) == (
        5000, imaging.Transform(False, True, 270), b"", spec)
    assert imaging.output_path(raw) == "/tmp/f.jpg"
