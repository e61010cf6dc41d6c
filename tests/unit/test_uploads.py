"""Upload slots and the streamed multipart form, against the simulator's
S3-like checks."""
from __future__ import annotations

import io
import threading
import time

import pytest

from klippy_extras.polar_cloud import (
    children,
    protocol,
    render,
    uploads,
)
from tests.testbed.polarsim import PolarSim
from tests.unit.fakes import needs_ffmpeg, timelapse_response, write_frames

SERIAL = "KL000001"


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
