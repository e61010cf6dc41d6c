"""The bounded GET (httpget.py) that the make list and the webcam list
share: the body whole, or one ValueError that says why not."""
from __future__ import annotations

import pytest

from klippy_extras.polar_cloud import httpget


class FakeResponse:
    def __init__(self, status: int, chunks: list[bytes]):
        self.status_code = status
        self.chunks = chunks
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return False
    def iter_content(self, size: int):
        assert size == httpget.CHUNK
        return iter(self.chunks)


class FakeHttp:
    def __init__(self, response: FakeResponse):
        self.response = response
        self.calls: list = []
    def get(self, url, **kwargs):
        self.calls.append((url, kwargs))
        return self.response


def test_the_body_is_read_whole_without_redirects():
    http = FakeHttp(FakeResponse(200, [b'{"a":', b' 1}']))
    body = httpget.get_body(http, "http://x/list", (1., 2.), 100, "the list",
                            params={"filter": "delta"})
    assert body == b'{"a": 1}'
    assert http.calls == [("http://x/list", {
        "timeout": (1., 2.), "stream": True, "allow_redirects": False,
        "params": {"filter": "delta"}})]


def test_an_answer_other_than_200_is_refused():
    http = FakeHttp(FakeResponse(302, [b"{}"]))
    with pytest.raises(ValueError, match="^HTTP 302$"):
        httpget.get_body(http, "http://x/", 1., 100, "the list")


def test_reading_stops_past_the_limit():
    chunks = [b"x" * 60, b"x" * 60, b"never read"]
    http = FakeHttp(FakeResponse(200, iter(chunks)))
    with pytest.raises(ValueError, match="^the list is too large$"):
        httpget.get_body(http, "http://x/", 1., 100, "the list")
    assert list(http.response.chunks) == [b"never read"]
