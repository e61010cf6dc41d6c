"""pinned.py, through an upload (uploads.post_form): the connection goes
to the address checked for the name, never to a second lookup's answer,
and still verifies the certificate for the name; failures in plain
words."""
from __future__ import annotations

import http.client
import io
import socket
import ssl
import threading
import time

import pytest

from klippy_extras.polar_cloud import pinned, uploads
from tests.testbed.fileserver import FileServer
from tests.testbed.tlsproxy import make_certs
from tests.unit.fakes import NAME, fake_dns

JPEG = b"\xff\xd8\xff" + b"x" * 5000


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


def post(url: str, ca_file: str = "", allow_loopback: bool = True) -> int:
    slot = uploads.UploadSlot("idle", "", url, {"key": "k"},
                              time.monotonic() + 600, 0, "image/jpeg")
    return uploads.post_form(slot, "snapshot.jpg", io.BytesIO(JPEG),
                             len(JPEG), allow_loopback, threading.Event(),
                             ca_file, lambda: None)


def test_an_upload_connects_only_to_the_address_it_checked(monkeypatch,
                                                           certs):
    with FileServer(b"", cert=certs["wrong_host"]) as checked, \
            FileServer(b"", cert=certs["wrong_host"], host="127.0.0.2",
                       port=checked.port) as other:
        lookups = fake_dns(monkeypatch, [["127.0.0.1"], ["127.0.0.2"]])
        assert post(checked.url("/up", host=NAME),
                    certs["ca"]["cert"]) == 200
    assert other.connections == 0 and lookups == [NAME]
    # Host header and SNI carry the name, not the address
    assert checked.requests == [{"path": "/up", "sni": NAME,
                                 "host": "%s:%d" % (NAME, checked.port)}]


def test_the_certificate_must_match_the_name(monkeypatch, certs):
    # "good" is valid for 127.0.0.1 (the address) but not for NAME
    with FileServer(b"", cert=certs["good"]) as srv:
        fake_dns(monkeypatch, [["127.0.0.1"]])
        with pytest.raises(uploads.UploadError) as err:
            post(srv.url("/up", host=NAME), certs["ca"]["cert"])
    assert str(err.value) == \
        "upload failed: TLS failed (certificate verify failed)"
    assert err.value.counts and not err.value.drop_slot
    assert srv.requests == []


def test_a_name_with_a_private_address_spends_the_slot(monkeypatch):
    with FileServer(b"") as srv:
        fake_dns(monkeypatch, [["10.1.2.3"]])
        with pytest.raises(uploads.UploadError) as err:
            post("https://%s:%d/up" % (NAME, srv.port), allow_loopback=False)
    assert str(err.value).startswith("refused upload URL: ")
    assert err.value.drop_slot and srv.connections == 0


@pytest.mark.parametrize("exc,words", [
    (ssl.SSLCertVerificationError("x"), "TLS failed (certificate verify"
                                        " failed)"),
    (ssl.SSLError("x"), "TLS failed"),
    (socket.timeout("timed out"), "no answer (timeout)"),
    (http.client.IncompleteRead(b"", 10), "incomplete answer"),
    (http.client.RemoteDisconnected("closed"), "connection failed"),
    (ConnectionRefusedError(111, "refused"), "connection failed"),
    (http.client.BadStatusLine("x"), "BadStatusLine"),
])
def test_failures_in_plain_words(exc, words):
    assert pinned.failure(exc) == words
