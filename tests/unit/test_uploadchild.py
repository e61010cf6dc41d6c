"""Uploads made by the upload child (uploader.py, through uploadchild.py)
against the simulator's S3-like checks and hostile servers: the outcome
comes back as the UploadError post_form would raise, a stop kills the
child at once, and HTTPS trusts ca_file."""
from __future__ import annotations

import os
import threading
import time

import pytest

from klippy_extras.polar_cloud import children, uploadchild, uploads
from tests.testbed.camera_server import quadrant_jpeg
from tests.testbed.fileserver import FileServer
from tests.testbed.helpers import children_running, poll_until
from tests.testbed.polarsim import PolarSim
from tests.testbed.tlsproxy import make_certs
from tests.unit.test_uploads import SERIAL

JPEG = quadrant_jpeg()


@pytest.fixture(scope="module")
def sim():
    s = PolarSim().start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


def slot_for(url: str, fields=None, max_size=5_000_000, expires=600.,
             kind="idle") -> uploads.UploadSlot:
    return uploads.UploadSlot(kind, "", url, fields or {"key": "k"},
                              time.monotonic() + expires, max_size,
                              "image/jpeg")


def sim_slot(sim, max_size=5_000_000) -> uploads.UploadSlot:
    form = sim.http.issue_form(SERIAL, "idle", "", 600, max_size,
                               "image/jpeg")
    return slot_for(sim.url + "/upload", dict(form.fields), max_size)


def kids() -> children.Children:
    return children.Children(threading.Event())


def test_a_snapshot_is_uploaded_by_the_child(sim):
    sim.reset_records()
    status = uploadchild.upload(kids(), sim_slot(sim), "image.jpg", True, "",
                                data=JPEG)
    assert status == 204
    [up] = sim.uploads
    assert up["filename"] == "image.jpg" and sim.violations == []


def test_a_file_is_streamed_from_its_path(sim, tmp_path):
    sim.reset_records()
    path = tmp_path / "image.jpg"
    path.write_bytes(JPEG)
    assert uploadchild.upload(kids(), sim_slot(sim), "image.jpg", True, "",
                              path=str(path)) == 204
    assert len(sim.uploads) == 1 and sim.violations == []
    with pytest.raises(uploads.UploadError, match="cannot read gone.jpg"):
        uploadchild.upload(kids(), sim_slot(sim), "image.jpg", True, "",
                           path=str(tmp_path / "gone.jpg"))


def test_failures_come_back_as_post_form_raises_them(sim):
    with pytest.raises(uploads.UploadError, match="more than") as e:
        uploadchild.upload(kids(), sim_slot(sim, 1024), "image.jpg", True, "",
                           data=bytes(2048))
    assert e.value.drop_slot and e.value.counts
    sim.http.upload_fail = 503
    try:
        with pytest.raises(uploads.UploadError, match="HTTP 503") as e:
            uploadchild.upload(kids(), sim_slot(sim), "image.jpg", True, "",
                               data=JPEG)
    finally:
        sim.http.upload_fail = None
    assert (e.value.status, e.value.drop_slot) == (503, False)
    with pytest.raises(uploads.UploadError, match="refused upload URL"):
        uploadchild.upload(kids(), slot_for(sim.url + "/upload"), "image.jpg",
                           False, "", data=JPEG)


def test_an_expired_slot_starts_no_child():
    host = children.HelperHost(children.HELPERS)
    with pytest.raises(uploads.UploadError) as e:
        uploadchild.upload(children.Children(threading.Event(), host),
                           slot_for("http://127.0.0.1:9/", expires=1.),
                           "image.jpg", True, "", data=JPEG)
    assert str(e.value) == uploads.URL_EXPIRED and not e.value.counts
    assert host.proc is None


def test_https_trusts_the_ca_file(certs):
    with FileServer(b"", cert=certs["good"]) as srv:
        assert uploadchild.upload(kids(), slot_for(srv.url("/up")),
                                  "image.jpg", True, certs["ca"]["cert"],
                                  data=JPEG) == 200
        with pytest.raises(uploads.UploadError, match="certificate verify failed"):
            uploadchild.upload(kids(), slot_for(srv.url("/up")), "image.jpg",
                               True, "", data=JPEG)


def test_a_stop_kills_a_hanging_upload_at_once():
    stop = threading.Event()
    owner = children.Children(stop)
    errors: list[uploads.UploadError] = []

    def run() -> None:
        try:
            uploadchild.upload(owner, slot_for(srv.url("/up")), "image.jpg",
                               True, "", data=JPEG)
        except uploads.UploadError as e:
            errors.append(e)

    with FileServer(behaviour="drip_headers", interval=0.5) as srv:
        thread = threading.Thread(target=run)
        thread.start()
        assert srv.dripping.wait(30.)
        assert children_running(os.getpid(), "uploader.py") != []
        stop.set()
        owner.kill_all()
        thread.join(30.)
        assert not thread.is_alive()
    assert [(str(e), e.counts) for e in errors] == [("stopped", False)]
    poll_until(lambda: children_running(os.getpid(), "uploader.py") == [],
               10.)
