"""The download child's work (fetcher.py), run in this process: it
connects only to the address it checked (and still verifies the
certificate for the name), refuses private addresses, keeps signed URLs
out of the log, answers one outcome, and never renames its file."""
from __future__ import annotations

import json
import logging

import pytest

from klippy_extras.polar_cloud import fetcher
from tests.testbed.fileserver import FileServer
from tests.testbed.tlsproxy import make_certs
from tests.unit.fakes import NAME, fake_dns

BODY = b"G28\nG1 X10 Y10\n"
PART = ".x_polar-j1.gcode.0123abcd.part"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


def request(url, dest, allow_loopback=True, **kw) -> fetcher.Request:
    return fetcher.Request(url, str(dest), PART, 1 << 30, allow_loopback,
                           **kw)


def fetch(url, dest, **kw) -> dict:
    return fetcher.answer(request(url, dest, **kw).encode(), lambda: None)


def test_a_download_lands_in_its_part_file_only(tmp_path):
    with FileServer(b"\xef\xbb\xbf" + BODY) as srv:
        result = fetch(srv.url(), tmp_path)
    assert result == {"ok": True, "size": len(BODY) + 3}
    # the parent renames; the BOM klippy cannot read is gone
    assert [p.name for p in tmp_path.iterdir()] == [PART]
    assert (tmp_path / PART).read_bytes() == BODY


def test_connects_only_to_the_address_it_checked(tmp_path, monkeypatch,
                                                 certs):
    with FileServer(BODY, cert=certs["wrong_host"]) as checked, \
            FileServer(b"G28\n; the other one\n", cert=certs["wrong_host"],
                       host="127.0.0.2", port=checked.port) as other:
        lookups = fake_dns(monkeypatch, [["127.0.0.1"], ["127.0.0.2"]])
        result = fetch(checked.url(host=NAME), tmp_path,
                       ca_file=certs["ca"]["cert"])
    assert result == {"ok": True, "size": len(BODY)}
    assert (tmp_path / PART).read_bytes() == BODY
    assert other.connections == 0
    # Host header and SNI carry the name, not the address
    assert checked.requests == [{"path": "/x.gcode", "sni": NAME,
                                 "host": "%s:%d" % (NAME, checked.port)}]
    assert lookups == [NAME]


def test_the_certificate_must_match_the_name(tmp_path, monkeypatch, certs):
    # "good" is valid for 127.0.0.1 (the address) but not for NAME
    with FileServer(BODY, cert=certs["good"]) as srv:
        fake_dns(monkeypatch, [["127.0.0.1"]])
        result = fetch(srv.url(host=NAME), tmp_path,
                       ca_file=certs["ca"]["cert"])
    assert not result["ok"] and result["error"].startswith("download failed")
    assert srv.requests == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("answer", [
    ["127.0.0.1", "10.1.2.3"],          # one private address is enough
    ["100.64.1.1"],                     # carrier-grade NAT
    ["192.168.1.20"],
])
def test_a_name_with_a_private_address_is_refused(tmp_path, monkeypatch,
                                                  answer):
    with FileServer(BODY) as srv:
        fake_dns(monkeypatch, [answer])
        result = fetch("https://%s:%d/x.gcode" % (NAME, srv.port), tmp_path)
    assert result == {"ok": False, "error": "refused download URL: the"
                      " address is not public"}
    assert srv.connections == 0


def test_no_signed_url_query_in_the_log(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="urllib3")
    query = ("X-Amz-Credential=AKIAEXAMPLE%2F20260101&X-Amz-Signature="
             + "5ec2e7" * 10)
    with FileServer(BODY) as srv:
        result = fetch(srv.url("/x.gcode?" + query), tmp_path)
    assert result["ok"] and srv.requests[0]["path"].startswith("/x.gcode?")
    assert "5ec2e7" not in caplog.text
    assert "AKIAEXAMPLE" not in caplog.text


def test_a_failure_of_its_own_is_an_answer_without_the_query(tmp_path,
                                                            monkeypatch):
    def boom(self):
        raise RuntimeError("GET /x.gcode?X-Amz-Signature=5ec2e7 failed")
    monkeypatch.setattr(fetcher.Fetch, "_download", boom)
    result = fetch("http://127.0.0.1:1/x.gcode", tmp_path)
    assert result["error"] == "download failed: RuntimeError"
    assert "5ec2e7" not in json.dumps(result)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("change", [
    {"part": "../x.part"}, {"part": "x.gcode"}, {"dest_dir": "relative"},
    {"max_bytes": "1"}, {"allow_loopback": 1}, {"url": None}])
def test_a_bad_request_is_refused(tmp_path, change):
    raw = json.loads(request("https://example.com/x.gcode", tmp_path).encode())
    raw.update(change)
    result = fetcher.answer(json.dumps(raw).encode(), lambda: None)
    assert not result["ok"] and "bad request" in result["error"]
    assert list(tmp_path.iterdir()) == []
