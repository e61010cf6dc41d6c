# Job downloads: a G-code URL streamed into a hidden temporary file
#
# Every check of the download policy is made here: the URL and each
# redirect (netpolicy.check_url), one DNS lookup whose addresses are the
# only ones connected to (or the proxy, which resolves the name), the
# size limit, the free space, the G-code sniffer, the total timeout.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import errno
import functools
import logging
import os
import select
import shutil
import socket
import threading
import time
import urllib.parse
from typing import Callable, Optional

from . import netpolicy
from .gcodefile import UTF8_BOM, GcodeSniffer

log = logging.getLogger("polar_cloud")

CHUNK = 64 * 1024
# A download flat out (LAN, loopback: hundreds of MB/s) loads the host
# enough to make klippy's reactor late by milliseconds; no cloud download
# needs more than this (bench/: 200 MB at 300 MB/s added 2-3 ms to the
# reactor's p99 lateness, at 64 MB/s nothing measurable)
MAX_RATE = 64 * 1024 * 1024
CONNECT_TIMEOUT = 15.
READ_TIMEOUT = 30.
TOTAL_TIMEOUT = 3600.
MAX_REDIRECTS = 3
FREE_SPACE_MARGIN = 64 * 1024 * 1024
Address = netpolicy.Address


class DownloadError(Exception):
    pass


REDIRECT_CODES = (301, 302, 303, 307, 308)
DEFAULT_PORTS = {"http": 80, "https": 443}
class Connections:
    """A download's sockets.  They connect only to the addresses checked
    for the download, and another thread can interrupt whatever they wait
    for (a connect, a TLS handshake, a read): shutdown() wakes it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # Duplicates: ssl's wrap_socket() detaches the original socket
        self.handles: list[socket.socket] = []
        self.aborted = False
    def connect(self, addresses: list[Address],
                timeout: float) -> socket.socket:
        error = OSError("no address to connect to")
        for family, sockaddr in addresses:
            try:
                return self._connect(family, sockaddr, timeout)
            except OSError as e:
                error = e
        raise error
    def _connect(self, family: int, sockaddr: tuple,
                 timeout: float) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._start_connect(sock, sockaddr)
            poller = select.poll()
            poller.register(sock, select.POLLOUT)
            if not poller.poll(int(timeout * 1000)):
                raise socket.timeout("connect timed out")
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if not err and self.aborted:
                err = errno.ECONNABORTED
            if err:
                raise OSError(err, os.strerror(err))
            sock.settimeout(timeout)
            return sock
        except BaseException:
            sock.close()
            raise
    def _start_connect(self, sock: socket.socket, sockaddr: tuple) -> None:
        # Under the lock: abort() comes either before (no connect at all)
        # or after the socket is connecting (its shutdown ends the connect)
        with self.lock:
            if self.aborted:
                raise ConnectionAbortedError(errno.ECONNABORTED, "aborted")
            self.handles.append(sock.dup())
            sock.setblocking(False)
            err = sock.connect_ex(sockaddr)
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))
    def abort(self) -> None:
        """Any thread; never blocks."""
        with self.lock:
            self.aborted = True
            for handle in self.handles:
                try:
                    handle.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
    def close(self) -> None:
        with self.lock:
            handles, self.handles = self.handles, []
        for handle in handles:
            handle.close()


@functools.cache
def _pool_classes() -> dict:
    """urllib3 pools whose connections go through Connections (imported
    late: klippy loads this module even when urllib3 is missing)."""
    from urllib3 import connection, connectionpool
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

    def pinned(base):
        class PinnedConnection(base):
            # self.host stays the name: the Host header, SNI and the
            # certificate check use it; only the peer address is pinned
            def __init__(self, *args, addresses=(), connections=None, **kw):
                super().__init__(*args, **kw)
                self.addresses = addresses
                self.connections = connections
            def _new_conn(self):
                try:
                    return self.connections.connect(self.addresses,
                                                    CONNECT_TIMEOUT)
                except socket.timeout as e:
                    raise ConnectTimeoutError(self, "timed out") from e
                except OSError as e:
                    raise NewConnectionError(self, str(e)) from e
        return PinnedConnection

    class HTTPPool(connectionpool.HTTPConnectionPool):
        ConnectionCls = pinned(connection.HTTPConnection)

    class HTTPSPool(connectionpool.HTTPSConnectionPool):
        ConnectionCls = pinned(connection.HTTPSConnection)
    return {"http": HTTPPool, "https": HTTPSPool}


def _request_target(parts: urllib.parse.SplitResult) -> str:
    return (parts.path or "/") + ("?" + parts.query if parts.query else "")


class Download:
    """Stream a G-code URL into a hidden temp file, then rename it.

    cancel(), a stop and the total timeout end it within moments whatever
    the server does: they shut its socket down under any blocking call.
    Directly, it connects only to the addresses it checked for the URL's
    name; through a proxy (netpolicy.proxy_for) it connects to the proxy,
    which resolves the name, and asks it for a CONNECT tunnel.  Either
    way the certificate is verified for the name, against the usual CAs
    and ca_file's."""

    def __init__(self, url: str, dest_dir: str, filename: str, max_bytes: int,
                 allow_loopback: bool, stop: threading.Event,
                 on_done: Callable[[str, int], None], ca_file: str = ""):
        self.url = url
        self.dest_dir = dest_dir
        self.filename = filename
        self.max_bytes = max_bytes
        self.allow_loopback = allow_loopback
        self.stop = stop
        self.on_done = on_done
        self.ca_file = ca_file
        self.cancelled = threading.Event()
        self.expired = threading.Event()
        self.connections = Connections()
        self.tmp_path = os.path.join(dest_dir, ".%s.part" % (filename,))
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name="polar_cloud-download")
        self.deadline = threading.Timer(TOTAL_TIMEOUT, self._expire)
        self.deadline.daemon = True
        self.deadline.name = "polar_cloud-download-deadline"
    def start(self) -> None:
        self.thread.start()
    def cancel(self) -> None:
        """Any thread; never blocks."""
        self.cancelled.set()
        self.connections.abort()
    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
    def _expire(self) -> None:
        self.expired.set()
        self.connections.abort()
    def _abort_reason(self) -> str:
        if self.expired.is_set():
            return "download took too long"
        if self.cancelled.is_set() or self.stop.is_set():
            return "download aborted"
        return ""
    def _check_aborted(self) -> None:
        reason = self._abort_reason()
        if reason:
            raise DownloadError(reason)
    def _run(self) -> None:
        netpolicy.hide_url_queries()
        error = ""
        size = 0
        try:
            self.deadline.start()
            size = self._download()
        except Exception as e:
            error = self._failure(e)
        finally:
            self._stop_deadline()
            self.connections.close()
            try:
                os.unlink(self.tmp_path)
            except OSError:
                pass
        self.on_done(error, size)
    def _stop_deadline(self) -> None:
        self.deadline.cancel()
        if self.deadline.ident is not None:
            self.deadline.join()        # wakes at once: it waits on an Event
    def _failure(self, e: Exception) -> str:
        # An aborted download fails in whatever way the shut socket made
        # it fail: report why it was aborted instead
        reason = self._abort_reason()
        if reason:
            return reason
        if isinstance(e, DownloadError):
            return str(e)
        log.exception("polar_cloud: download failed")
        return "download failed: %s" % (e.__class__.__name__,)
    def _checked_addresses(self, host: str, port: int) -> list[Address]:
        """One lookup, every address checked: the download connects to
        these only, never to a second lookup's answer (DNS rebinding)."""
        try:
            addresses = netpolicy.resolve(host, port)
        except OSError as e:
            raise DownloadError("cannot resolve %s: %s" % (host, e)) from e
        problem = netpolicy.refused_address(addresses, self.allow_loopback)
        if problem:
            raise DownloadError("refused download URL: %s" % (problem,))
        return addresses
    def _proxy_addresses(self, host: str,
                         proxy: netpolicy.Proxy) -> list[Address]:
        """The proxy's addresses (the administrator's choice: a LAN address
        is fine), from one lookup."""
        try:
            return netpolicy.resolve(proxy.host, proxy.port)
        except OSError as e:
            raise DownloadError(netpolicy.proxy_failure(host, proxy, e)) \
                from e
    def _pool(self, parts: urllib.parse.SplitResult, addresses: list[Address],
              proxy: Optional[netpolicy.Proxy] = None):
        from urllib3.util import Timeout, make_headers, parse_url
        options = {"port": parts.port or DEFAULT_PORTS[parts.scheme],
                   "maxsize": 1, "retries": False,
                   "timeout": Timeout(connect=CONNECT_TIMEOUT,
                                      read=READ_TIMEOUT),
                   "addresses": addresses, "connections": self.connections}
        if parts.scheme == "https":
            options.update(cert_reqs="CERT_REQUIRED",
                           ssl_context=netpolicy.tls_context(self.ca_file))
        if proxy is not None:
            # The pool's connections go to the proxy and tunnel through it
            auth = proxy.basic_auth()
            options.update(_proxy=parse_url(proxy.shown), _proxy_headers=(
                make_headers(proxy_basic_auth=auth) if auth else {}))
        return _pool_classes()[parts.scheme](parts.hostname, **options)
    def _request(self, url: str):
        """One GET, to an address checked for the URL's host or through
        the proxy for the URL."""
        from urllib3.exceptions import HTTPError, ProxyError
        problem = netpolicy.check_url(url, self.allow_loopback)
        if problem:
            raise DownloadError("refused download URL: %s" % (problem,))
        self._check_aborted()
        parts = urllib.parse.urlsplit(url)
        port = parts.port or DEFAULT_PORTS[parts.scheme]
        try:
            proxy = netpolicy.proxy_for(url)
        except netpolicy.ProxyError as e:
            raise DownloadError(str(e)) from None
        if proxy is not None and parts.scheme != "https":
            # Only loopback test servers use http, and never a proxy
            raise DownloadError("refused download URL: plain http through"
                                " a proxy")
        if proxy is None:
            pool = self._pool(parts, self._checked_addresses(parts.hostname,
                                                             port))
        else:
            pool = self._pool(parts, self._proxy_addresses(parts.hostname,
                                                           proxy), proxy)
        try:
            resp = pool.urlopen("GET", _request_target(parts),
                                redirect=False, retries=False,
                                preload_content=False)
        except BaseException as e:
            pool.close()
            if proxy is not None and isinstance(e, ProxyError):
                raise DownloadError(netpolicy.proxy_failure(
                    parts.hostname, proxy, e)) from e
            if isinstance(e, (HTTPError, OSError)):
                raise DownloadError("download failed: %s"
                                    % (e.__class__.__name__,)) from e
            raise
        return pool, resp
    def _open(self):
        url = self.url
        for _ in range(MAX_REDIRECTS + 1):
            pool, resp = self._request(url)
            location = resp.headers.get("location")
            if resp.status not in REDIRECT_CODES or not location:
                return pool, resp
            resp.close()
            pool.close()
            url = urllib.parse.urljoin(url, location)
        raise DownloadError("too many redirects")
    def _download(self) -> int:
        free = shutil.disk_usage(self.dest_dir).free
        if free < FREE_SPACE_MARGIN:
            raise DownloadError("insufficient disk space")
        pool, resp = self._open()
        try:
            self._check_headers(resp, free)
            return self._stream(resp)
        finally:
            resp.close()
            pool.close()
    def _check_headers(self, resp, free: int) -> None:
        if resp.status != 200:
            raise DownloadError("download failed: HTTP %d" % (resp.status,))
        length = resp.headers.get("content-length")
        if length is not None and length.isdigit():
            if int(length) > self.max_bytes:
                raise DownloadError("the file is larger than max_job_size")
            if int(length) + FREE_SPACE_MARGIN > free:
                raise DownloadError("insufficient disk space")
        if "text/html" in resp.headers.get("content-type", ""):
            raise DownloadError("not a G-code file (an HTML page)")
    def _stream(self, resp) -> int:
        from urllib3.exceptions import HTTPError
        self._check_aborted()
        size = 0
        sniffer = GcodeSniffer()
        fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                     0o644)
        paced_from = time.monotonic()
        with os.fdopen(fd, "wb") as f:
            try:
                for chunk in resp.stream(CHUNK):
                    self._check_aborted()
                    if not sniffer.decided:
                        problem = sniffer.feed(chunk)
                        if problem:
                            raise DownloadError(problem)
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise DownloadError("the file is larger than"
                                            " max_job_size")
                    if size == len(chunk) and chunk.startswith(UTF8_BOM):
                        # klippy does not skip a BOM: "Malformed command"
                        chunk = chunk[len(UTF8_BOM):]
                    f.write(chunk)
                    ahead = paced_from + size / MAX_RATE - time.monotonic()
                    if ahead > 0.:
                        self.cancelled.wait(ahead)
                    if size % (16 * CHUNK) < len(chunk) and \
                            shutil.disk_usage(self.dest_dir).free \
                            < FREE_SPACE_MARGIN:
                        raise DownloadError("insufficient disk space")
            except HTTPError as e:
                raise DownloadError("download interrupted: %s"
                                    % (e.__class__.__name__,)) from e
            except OSError as e:
                raise DownloadError("cannot write the file: %s"
                                    % (e.strerror,)) from e
            problem = sniffer.finish()
            if problem:
                raise DownloadError(problem)
            length = resp.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) != size:
                raise DownloadError("download interrupted (truncated)")
            f.flush()
            os.fsync(f.fileno())
        self._check_aborted()
        os.replace(self.tmp_path, os.path.join(self.dest_dir, self.filename))
        return size
