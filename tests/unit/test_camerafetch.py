"""camerafetch.py, the imaging child's GET of the camera's snapshot:
redirects, a proxy for plain http, the limits, failures in plain
words.  (Through an HTTPS proxy: klippy/test_proxy.py, with squid.)"""
from __future__ import annotations

import pytest

from klippy_extras.polar_cloud import camerafetch, imaging
from tests.testbed.fileserver import FileServer

FRAME = b"\xff\xd8" + b"\x10" * 5000 + b"\xff\xd9"


def spec(url: str, **kw) -> imaging.Fetch:
    return imaging.Fetch(url, 5., 5., 10., kw.pop("max_bytes", 1 << 20),
                         **kw)


def fetch(url: str, **kw) -> bytes:
    calls = []
    data = camerafetch.fetch(spec(url, **kw), lambda: calls.append(1))
    assert calls        # paced after each block
    return data


def test_a_frame_after_a_redirect():
    with FileServer(FRAME, redirects={"/snap": "/x.jpg"}) as cam:
        assert fetch(cam.url("/snap")) == FRAME
    assert [r["path"] for r in cam.requests] == ["/snap", "/x.jpg"]


def test_redirects_are_followed_three_times_at_most():
    with FileServer(FRAME, redirects={"/a": "/b", "/b": "/c", "/c": "/d",
                                      "/d": "/e"}) as cam, \
            pytest.raises(camerafetch.FetchFailed,
                          match="^too many redirects$"):
        fetch(cam.url("/a"))
    assert len(cam.requests) == 4


def test_plain_http_through_a_proxy_asks_it_for_the_url():
    with FileServer(FRAME) as proxy:
        url = "http://camera.example.com:8080/snap?action=snapshot"
        assert fetch(url, proxy="http://us%40er:p%3Ass@127.0.0.1:"
                     + str(proxy.port)) == FRAME
    assert proxy.requests[0]["path"] == url
    # us@er:p:ss
    assert proxy.headers[0]["proxy-authorization"] == \
        "Basic dXNAZXI6cDpzcw=="


@pytest.mark.parametrize("url,words", [
    ("ftp://camera/x.jpg", "not an http(s) URL"),
    ("http:///x.jpg", "not an http(s) URL"),
])
def test_what_is_not_a_camera_url(url, words):
    with pytest.raises(camerafetch.FetchFailed, match="^%s$" % (
            words.replace("(", r"\(").replace(")", r"\)"),)):
        fetch(url)


def test_a_frame_over_the_limit():
    with FileServer(FRAME * 3) as cam, pytest.raises(camerafetch.FetchFailed,
                       match="^snapshot larger than 0 MB$"):
        fetch(cam.url(), max_bytes=len(FRAME))
