"""The link to Polar Cloud (link.py) without a network: the Inbox (what a
flood keeps, R6/R10), the size limit on inbound messages, the Link over a
fake Socket.IO client, and the words for a failed connection."""
from __future__ import annotations

import socket
import ssl
import threading
import time
import types

import pytest

from klippy_extras.polar_cloud import link as links
from tests.unit.fakes import FakeSio

# ------------------------------------------------------------------ Inbox

def test_flooded_inbox_keeps_job_events(tmp_path):
    inbox = links.Inbox(limit=256)
    inbox.put_network("print", {"jobId": "first"})
    for i in range(1000):
        inbox.put_network("temperature", {"bed": i})
        if i == 500:
            inbox.put_network("cancel", {})
    inbox.put_network("print", {"jobId": "last"})
    got = []
    while True:
        item = inbox.get(0.)
        if item is None:
            break
        got.append(item[1:])
    names = [n for n, _ in got]
    assert len(got) == 256 and inbox.dropped == 1003 - 256
    assert [d for n, d in got if n == "print"] == [{"jobId": "first"},
                                                    {"jobId": "last"}]
    assert names.count("cancel") == 1
    # Order is kept, and the newest refreshable events won over the oldest
    assert [d["bed"] for n, d in got if n == "temperature"] == list(
        range(1000 - 253, 1000))


def test_inbox_full_of_critical_events_drops_new_ones():
    inbox = links.Inbox(limit=4)
    for i in range(6):
        inbox.put_network("print", {"jobId": str(i)})
    assert inbox.dropped == 2
    assert [inbox.get(0.)[2]["jobId"] for _ in range(4)] == list("0123")


def test_cloud_names_never_become_calls_or_link_news():
    inbox = links.Inbox(limit=8)
    calls = []
    inbox.put_network("disconnect", None)
    inbox.put_local(calls.append, "local")
    inbox.put_link("disconnect")
    kinds = [inbox.get(0.)[:2] for _ in range(3)]
    assert kinds == [(links.CALL, calls.append), (links.CLOUD, "disconnect"),
                     (links.LINK, "disconnect")]


def test_local_calls_come_before_network_events():
    inbox = links.Inbox()
    inbox.put_network("print", {"jobId": "1"})
    inbox.put_local(print, "a")
    assert inbox.get(0.)[0] == links.CALL
    assert inbox.get(0.)[:2] == (links.CLOUD, "print")
    assert inbox.get(0.) is None


def test_get_waits_for_an_entry_and_wake_ends_the_wait():
    inbox = links.Inbox()
    threading.Timer(.05, inbox.put_network, ("pause", {})).start()
    assert inbox.get(5.)[1] == "pause"
    threading.Timer(.05, inbox.wake).start()
    started = time.monotonic()
    assert inbox.get(5.) is None
    assert time.monotonic() - started < 4.


# ------------------------------------------------------ SizeLimitedSocket

class FakeWebSocket:
    def __init__(self, frames) -> None:
        self.frames = list(frames)
        self.sock = "raw socket"

    def recv(self):
        return self.frames.pop(0)


def test_small_messages_pass_through_unchanged():
    inbox = links.Inbox()
    ws = links.SizeLimitedSocket(FakeWebSocket(['42["status",{}]', b"x"]),
                                 100, inbox)
    assert ws.recv() == '42["status",{}]'
    assert ws.recv() == b"x"
    assert inbox.get(0.) is None
    assert ws.sock == "raw socket"          # everything else is the socket's


@pytest.mark.parametrize("frame", [
    '42["print",{"jobId":"j1","jobName":"' + "x" * 5000 + '"}]',
    ('42["print",{"jobId":"j1","jobName":"' + "\u00fc" * 5000 + '"}]'
     ).encode(),
])
def test_an_oversized_message_becomes_a_noop_and_link_news(frame):
    inbox = links.Inbox()
    ws = links.SizeLimitedSocket(FakeWebSocket([frame]), 1000, inbox)
    assert ws.recv() == "6"                 # Engine.IO's noop
    kind, name, (size, head) = inbox.get(0.)
    assert (kind, name, size) == (links.LINK, "oversized", len(frame))
    assert isinstance(head, str) and len(head) <= links.OVERSIZED_HEAD
    assert links.OVERSIZED_EVENT_RE.match(head).group(1) == "print"
    assert links.OVERSIZED_JOB_RE.search(head).group(1) == "j1"


# ------------------------------------------------------------------- Link

def test_link_over_a_connected_client():
    sio = FakeSio()
    link = links.Link.open(lambda inbox, verify, timeout, proxy=None: sio,
                           links.Inbox(), "http://127.0.0.1:1", True)
    assert link.connected and link.backlog() == 0 and link.last_rx() == 0.
    sio.eio.last_rx, sio.eio.queue.size = 12.5, 3
    assert (link.last_rx(), link.backlog()) == (12.5, 3)
    link.emit("status", {"x": 1})
    assert sio.emits == [("status", {"x": 1})]
    link.close()
    # aborted at once, and the write thread woken to see it
    assert not link.connected and sio.eio.aborted
    assert sio.eio.queue.items == [None]


def test_a_failed_connect_closes_the_client_and_raises():
    sio = FakeSio(fail_connect=True)
    with pytest.raises(ConnectionError):
        links.Link.open(lambda inbox, verify, timeout, proxy=None: sio, links.Inbox(),
                        "http://127.0.0.1:1", True)
    assert sio.eio.aborted


def test_close_shuts_the_raw_socket_down_first():
    sio = FakeSio()
    a, b = socket.socketpair()
    sio.eio.ws = types.SimpleNamespace(sock=a, shutdown=lambda: None)
    links.Link(sio).close()
    assert b.recv(10) == b""                # the peer sees the end
    a.close()
    b.close()


# ---------------------------------------------------- connect_error_text

URL = "https://printer4.polar3d.com"


def test_a_failed_connection_names_the_server_and_the_reason():
    text = links.connect_error_text(ConnectionError("refused"), URL)
    assert text == "cannot connect to %s: refused" % (URL,)
    assert links.connect_error_text(TimeoutError(), URL) == (
        "cannot connect to %s: TimeoutError" % (URL,))


def test_a_certificate_problem_deep_in_the_chain_is_named():
    cert = ssl.SSLCertVerificationError("certificate verify failed")
    cert.verify_message = "certificate has expired"
    try:
        try:
            raise cert
        except ssl.SSLError as e:
            raise ConnectionError("engineio: connection error") from e
    except ConnectionError as outer:
        wrapped = outer
    assert links.connect_error_text(wrapped, URL) == (
        "TLS verification failed: certificate has expired")


def test_an_unset_clock_is_named_before_any_tls_error(monkeypatch):
    monkeypatch.setattr(links, "time", types.SimpleNamespace(
        time=lambda: 978307200., monotonic=time.monotonic))
    text = links.connect_error_text(ssl.SSLCertVerificationError("x"), URL)
    assert "system clock is not set" in text


def test_local_ip_is_the_address_towards_the_server():
    assert links.local_ip("http://127.0.0.1:1") == "127.0.0.1"
    # Not an IPv4 host at all: loopback rather than an exception
    assert links.local_ip("http://[::1]:1") == "127.0.0.1"
