"""The Download worker (download.py) against hostile file servers: cancel and
the total timeout end it whatever the server does, it connects only to
the address it checked (and still verifies the certificate for the name),
no signed URL reaches the log, and its own failure ends the job (R24)."""
from __future__ import annotations

import logging
import socket
import threading
import time

import pytest

from klippy_extras.polar_cloud import download
from tests.testbed.fileserver import FileServer
from tests.testbed.helpers import poll_until
from tests.testbed.tlsproxy import make_certs

NAME = "polar.example.com"      # the name the test certificates are for
BODY = b"G28\nG1 X10 Y10\n"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


def start_download(url, dest, allow_loopback=True, **kw):
    results: list[tuple[str, int]] = []
    dl = download.Download(url, str(dest), "x_polar-j1.gcode", 1 << 30,
                       allow_loopback, threading.Event(),
                       lambda err, size: results.append((err, size)), **kw)
    dl.start()
    return dl, results


def fake_dns(monkeypatch, answers: list[list[str]]) -> list[str]:
    """NAME resolves to answers[0] on the first lookup, answers[1] on the
    second, ... (the last repeats): a name that rebinds between lookups.
    Returns the list of lookups made."""
    real = socket.getaddrinfo
    calls: list[str] = []

    def getaddrinfo(host, port, *args, **kw):
        if host != NAME:
            return real(host, port, *args, **kw)
        addrs = answers[min(len(calls), len(answers) - 1)]
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "",
                 (addr, int(port or 0))) for addr in addrs]
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return calls


# --------------------------------------------- cancel and total timeout

@pytest.mark.parametrize("behaviour", ["drip_body", "drip_headers"])
def test_cancel_ends_a_dripping_download(tmp_path, behaviour):
    with FileServer(BODY, behaviour) as srv:
        dl, results = start_download(srv.url(), tmp_path)
        assert srv.dripping.wait(10)
        cancelled = time.monotonic()
        dl.cancel()
        dl.join(10.)
        assert not dl.thread.is_alive()
        print("cancel -> download ended in %.3f s"
              % (time.monotonic() - cancelled))
        assert results == [("download aborted", 0)]
        assert list(tmp_path.iterdir()) == []
        assert srv.client_gone.wait(10)


def syn_sent(port: int) -> int:
    """TCP connects to the port still waiting for an answer."""
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return len([r for r in rows if r[3] == "02"
                and int(r[2].split(":")[1], 16) == port])


def test_cancel_ends_a_connect_the_server_never_accepts(tmp_path):
    # A listener whose accept queue is full: the kernel drops new SYNs
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    port = lsock.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        waiting = poll_until(lambda: syn_sent(port), 10, "fillers")
        dl, results = start_download("http://127.0.0.1:%d/x.gcode" % (port,),
                                     tmp_path)
        poll_until(lambda: syn_sent(port) > waiting, 10, "the connect")
        dl.cancel()
        dl.join(10.)
        assert not dl.thread.is_alive()
        assert results == [("download aborted", 0)]
    finally:
        for s in fillers:
            s.close()
        lsock.close()


@pytest.mark.parametrize("behaviour", ["drip_body", "drip_headers"])
def test_total_timeout_ends_a_dripping_download(tmp_path, monkeypatch,
                                                behaviour):
    monkeypatch.setattr(download, "TOTAL_TIMEOUT", 1.)
    with FileServer(BODY, behaviour, interval=0.1) as srv:
        dl, results = start_download(srv.url(), tmp_path)
        dl.join(30.)
        assert not dl.thread.is_alive()
        assert results == [("download took too long", 0)]
        assert list(tmp_path.iterdir()) == []


def test_a_finished_download_leaves_no_thread_or_socket(tmp_path):
    before = {t.name for t in threading.enumerate()}
    with FileServer(BODY) as srv:
        dl, results = start_download(srv.url(), tmp_path)
        dl.join(30.)
    assert results == [("", len(BODY))]
    assert (tmp_path / "x_polar-j1.gcode").read_bytes() == BODY
    assert not dl.thread.is_alive()
    assert {t.name for t in threading.enumerate()
            if t.name.startswith("polar_cloud")} <= before
    assert dl.connections.handles == []


# ------------------------------------------------- address pinning

def test_connects_only_to_the_address_it_checked(tmp_path, monkeypatch,
                                                 certs):
    with FileServer(BODY, cert=certs["wrong_host"]) as checked, \
            FileServer(b"G28\n; the other one\n", cert=certs["wrong_host"],
                       host="127.0.0.2", port=checked.port) as other:
        lookups = fake_dns(monkeypatch, [["127.0.0.1"], ["127.0.0.2"]])
        dl, results = start_download(checked.url(host=NAME), tmp_path,
                                     ca_file=certs["ca"]["cert"])
        dl.join(30.)
    assert results == [("", len(BODY))]
    assert (tmp_path / "x_polar-j1.gcode").read_bytes() == BODY
    assert other.connections == 0
    # Host header and SNI carry the name, not the address
    assert checked.requests == [{"path": "/x.gcode", "sni": NAME,
                                 "host": "%s:%d" % (NAME, checked.port)}]
    assert lookups == [NAME]


def test_the_certificate_must_match_the_name(tmp_path, monkeypatch, certs):
    # "good" is valid for 127.0.0.1 (the address) but not for NAME
    with FileServer(BODY, cert=certs["good"]) as srv:
        fake_dns(monkeypatch, [["127.0.0.1"]])
        dl, results = start_download(srv.url(host=NAME), tmp_path,
                                     ca_file=certs["ca"]["cert"])
        dl.join(30.)
    assert len(results) == 1 and results[0][0].startswith("download failed")
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
        dl, results = start_download(
            "https://%s:%d/x.gcode" % (NAME, srv.port), tmp_path)
        dl.join(30.)
    assert results == [("refused download URL: the address is not public",
                        0)]
    assert srv.connections == 0


# ------------------------------------------------------- the log

def test_no_signed_url_query_in_the_log(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="urllib3")
    query = ("X-Amz-Credential=AKIAEXAMPLE%2F20260101&X-Amz-Signature="
             + "5ec2e7" * 10)
    with FileServer(BODY) as srv:
        dl, results = start_download(srv.url("/x.gcode?" + query), tmp_path)
        dl.join(30.)
    assert results == [("", len(BODY))]
    # urllib3 did log the request (the capture works), without the query
    assert [r for r in caplog.records if r.name.startswith("urllib3")
            and "/x.gcode" in r.getMessage()]
    assert "5ec2e7" not in caplog.text
    assert "AKIAEXAMPLE" not in caplog.text


def boom(*args, **kw):
    raise RuntimeError("injected")


def test_download_worker_exception_cancels_the_job(tmp_path, monkeypatch):
    """R24 for the download worker: the thread's own failure ends the job
    with a report, and no partial file stays."""
    results = []
    dl = download.Download("http://127.0.0.1:1/x.gcode", str(tmp_path),
                           "x_polar-j1.gcode", 1 << 20, True,
                           threading.Event(),
                           lambda err, size: results.append((err, size)))
    monkeypatch.setattr(dl, "_download", boom)
    dl.start()
    dl.join(10.)
    assert results == [("download failed: RuntimeError", 0)]
    assert list(tmp_path.iterdir()) == []
