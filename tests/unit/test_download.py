"""The job download's parent side (download.py) with its real helper
child (fetcher.py) against hostile file servers: the bytes never pass
through this process, cancel and the total timeout kill the child
whatever the server does, and a child that dies ends the job (R24)."""
from __future__ import annotations

import logging
import os
import socket
import threading

import pytest

from klippy_extras.polar_cloud import download
from tests.testbed.fileserver import FileServer
from tests.testbed.helpers import children_running, poll_until

BODY = b"G28\nG1 X10 Y10\n"
FILENAME = "x_polar-j1.gcode"


def start_download(url, dest, allow_loopback=True, **kw):
    results: list[tuple[str, int]] = []
    dl = download.Download(url, str(dest), FILENAME, 1 << 30,
                           allow_loopback, threading.Event(),
                           lambda err, size: results.append((err, size)),
                           **kw)
    dl.start()
    return dl, results


def finished(dl) -> None:
    dl.join(60.)
    assert not dl.thread.is_alive()


def sockets_to(port: int) -> int:
    """This process's TCP sockets connected to the port."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink("/proc/self/fd/" + fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as f:
            for row in (line.split() for line in f.readlines()[1:]):
                if int(row[2].split(":")[1], 16) == port \
                        and row[9] in inodes:
                    count += 1
    return count


def fetchers(dl) -> list[int]:
    """The pids of the download's running children that run fetcher.py."""
    if not dl.children.tasks:
        return []
    return children_running(os.getpid(), "fetcher.py")


def test_a_download_ends_in_its_file_with_nothing_left(tmp_path):
    before = {t.name for t in threading.enumerate()}
    with FileServer(BODY) as srv:
        dl, results = start_download(srv.url(), tmp_path)
        finished(dl)
    assert results == [("", len(BODY))]
    assert [p.name for p in tmp_path.iterdir()] == [FILENAME]
    assert (tmp_path / FILENAME).read_bytes() == BODY
    assert {t.name for t in threading.enumerate()
            if t.name.startswith("polar_cloud")} <= before
    assert dl.children.tasks == set()


class SettleRecorder:
    """The download's cancelled event, recording at each wait whether the
    file was asked for and whether it is in place."""
    def __init__(self, event, server, path):
        self.event, self.server, self.path, self.seen = event, server, path, []
    def wait(self, timeout):
        self.seen.append((timeout, len(self.server.requests),
                          os.path.exists(self.path)))
        return self.event.is_set()
    def __getattr__(self, name):
        return getattr(self.event, name)


def test_the_child_starts_and_the_job_goes_on_a_moment_apart(tmp_path):
    """SETTLE before the fork (after the job's acceptance) and after the
    child's exit (before klippy's print start)."""
    with FileServer(BODY) as srv:
        results: list = []
        dl = download.Download(srv.url(), str(tmp_path), FILENAME, 1 << 30,
                               True, threading.Event(),
                               lambda err, size: results.append((err, size)))
        dl.cancelled = SettleRecorder(dl.cancelled, srv,
                                      str(tmp_path / FILENAME))
        dl.start()
        finished(dl)
        assert results == [("", len(BODY))]
        assert dl.cancelled.seen == [(download.SETTLE, 0, False),
                                     (download.SETTLE, 1, True)]


@pytest.mark.parametrize("behaviour", ["drip_body", "drip_headers"])
def test_the_child_downloads_and_cancel_kills_it(tmp_path, behaviour):
    with FileServer(BODY, behaviour) as srv:
        dl, results = start_download(srv.url(), tmp_path)
        assert srv.dripping.wait(20)
        # The connection is the child's, not this process's
        pids = poll_until(lambda: fetchers(dl), 10, "the download child")
        assert sockets_to(srv.port) == 0
        dl.cancel()
        finished(dl)
        assert results == [("download aborted", 0)]
        assert list(tmp_path.iterdir()) == []
        assert not os.path.exists("/proc/%d/cmdline" % (pids[0],)) \
            or fetchers(dl) == []
        assert srv.client_gone.wait(10)


def test_a_stop_before_the_answer_renames_nothing(tmp_path):
    with FileServer(BODY, "drip_body") as srv:
        dl, results = start_download(srv.url(), tmp_path)
        assert srv.dripping.wait(20)
        dl.stop.set()
        dl.cancel()             # JobManager.stop()
        finished(dl)
    assert results == [("download aborted", 0)]
    assert list(tmp_path.iterdir()) == []


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
        poll_until(lambda: syn_sent(port) > waiting, 20, "the connect")
        dl.cancel()
        finished(dl)
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
        finished(dl)
    assert results == [("download took too long", 0)]
    assert list(tmp_path.iterdir()) == []


def test_the_child_refusing_answers_with_its_reason(tmp_path):
    with FileServer(b"PK\x03\x04" + b"\0" * 64) as srv:
        dl, results = start_download(srv.url(), tmp_path)
        finished(dl)
    assert results == [("not a G-code file (a ZIP or 3MF archive)", 0)]
    assert list(tmp_path.iterdir()) == []


def test_a_child_that_dies_ends_the_job(tmp_path, monkeypatch, caplog):
    """The download child crashing: a crash is a failed download, logged
    without the signed URL's query, and no partial file stays."""
    script = tmp_path / "crash.py"
    script.write_text("import sys\nsys.stderr.write('GET /x.gcode?"
                      "X-Amz-Signature=5ec2e7 boom\\n')\nsys.exit(3)\n")
    dest = tmp_path / "sd"
    dest.mkdir()
    monkeypatch.setattr(download, "FETCHER", str(script))
    with caplog.at_level(logging.WARNING, logger="polar_cloud"):
        dl, results = start_download("http://127.0.0.1:1/x.gcode?"
                                     "X-Amz-Signature=5ec2e7", dest)
        finished(dl)
    assert results == [("download failed: the download process ended", 0)]
    assert "exit code 3" in caplog.text and "5ec2e7" not in caplog.text
    assert list(dest.iterdir()) == []
