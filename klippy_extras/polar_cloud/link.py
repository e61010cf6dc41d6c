# The link to Polar Cloud: everything that knows python-socketio and
# python-engineio.
#
# The Socket.IO client runs its own read and write threads.  They cross
# into the session in one place, the Inbox: every cloud event, and news
# about the link, is queued there and handled by the session thread.
#
# python-engineio internals relied on here (checked against 4.12):
#   Client._receive_packet(pkt), Client._read_loop_websocket(), Client.ws
#   (a websocket-client WebSocket with .sock), Client.queue (the outbound
#   packet queue), Client.disconnect(abort=True), and
#   socketio.Client._engineio_client_class().  Proxies (checked against
#   python-engineio 4.15 and websocket-client 1.9): websocket_extra_options
#   override what python-engineio derives from its requests session, and
#   websocket-client reads the environment only without them.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import collections
import re
import socket
import ssl
import threading
import time
import urllib.parse
from typing import Any, Callable, Optional

from . import netpolicy, protocol

SOCKET_CONNECT_TIMEOUT = 20.
WELCOME_WAIT = 10
MAX_NETWORK_QUEUE = 256
# The largest message read from the cloud (a print with a 16 KB download
# URL is far below it); larger ones are dropped before decoding
MAX_INBOUND_BYTES = 1 << 20
OVERSIZED_HEAD = 4096
OVERSIZED_EVENT_RE = re.compile(r'^\d+\[\s*"([A-Za-z_]{1,32})"')
OVERSIZED_JOB_RE = re.compile(
    r'"jobId"\s*:\s*(?:"([^"\\]{1,128})"|(\d{1,20}))')


# Never dropped for a flood of other events: losing one would lose a job,
# a command the user gave in the cloud, or a connection state change.
CRITICAL_EVENTS = frozenset({
    "print", "pause", "resume", "cancel", "delete", "welcome",
    "registerResponse", "helloResponse", "unregisterResponse"})
# Inbox entries: a cloud event by name, news about the link by name, or a
# call for the session's own threads.  They never share a namespace:
# nothing the cloud sends can become link news or a call.
CLOUD = "cloud"
LINK = "link"
CALL = "call"


class Inbox:
    """Work for the supervisor: cloud events (bounded) and calls.

    News from the link (a disconnect) queues behind the cloud events that
    came before it; calls from klippy and helper threads go first.  When
    a flood fills the network queue, the oldest cloud event that is not
    critical makes room; only when the queue holds nothing but critical
    events and calls is the new event dropped (and counted).
    """

    def __init__(self, limit: int = MAX_NETWORK_QUEUE):
        self.cond = threading.Condition()
        self.network: collections.deque = collections.deque()
        self.local: collections.deque = collections.deque()
        self.limit = limit
        self.dropped = 0
    def put_network(self, name: str, data: Any) -> None:
        """A cloud event, from the Socket.IO read thread."""
        with self.cond:
            if len(self.network) >= self.limit:
                self.dropped += 1
                victim = next((i for i, (kind, n, _d)
                               in enumerate(self.network) if kind == CLOUD
                               and n not in CRITICAL_EVENTS), None)
                if victim is None:
                    return
                del self.network[victim]
            self.network.append((CLOUD, name, data))
            self.cond.notify()
    def put_link(self, name: str, data: Any = None) -> None:
        """News about the link, in order with the cloud events."""
        with self.cond:
            self.network.append((LINK, name, data))
            self.cond.notify()
    def put_local(self, fn: Callable, *args) -> None:
        """A call from klippy or a helper thread."""
        with self.cond:
            self.local.append((CALL, fn, args))
            self.cond.notify()
    def wake(self) -> None:
        with self.cond:
            self.cond.notify()
    def get(self, timeout: float):
        with self.cond:
            if not self.local and not self.network and timeout > 0.:
                self.cond.wait(timeout)
            if self.local:
                return self.local.popleft()
            if self.network:
                return self.network.popleft()
            return None


class SizeLimitedSocket:
    """A websocket whose oversized messages never reach a JSON decoder.

    python-engineio decodes every frame it reads; a 3 MB message of
    `[{},{},...]` becomes tens of megabytes of Python objects.  An
    oversized frame is replaced by an Engine.IO no-op here, and the
    session is told its size and its first bytes.
    """

    def __init__(self, ws, limit: int, inbox: Inbox):
        self.ws = ws
        self.limit = limit
        self.inbox = inbox
    def recv(self):
        data = self.ws.recv()
        if len(data) <= self.limit:
            return data
        head = data[:OVERSIZED_HEAD]
        if isinstance(head, bytes):
            head = head.decode("utf-8", "replace")
        self.inbox.put_link("oversized", (len(data), head))
        return "6"          # Engine.IO's noop packet
    def __getattr__(self, name: str):
        return getattr(self.ws, name)


def websocket_proxy_options(proxy: Optional[netpolicy.Proxy]) -> dict:
    """websocket-client's proxy options for the link.

    python-engineio hands websocket-client only the proxies of its requests
    session, and websocket-client reads http(s)_proxy and no_proxy from
    the environment by itself, with its own NO_PROXY rules.  Every option
    is given here instead, so the decision is netpolicy.proxy_for()'s
    alone: http_no_proxy is never empty, or the environment is read."""
    if proxy is None:
        return {"http_no_proxy": ["*"]}
    auth = (proxy.username, proxy.password) if proxy.basic_auth() else None
    # localhost: the only name a proxy is never used for anyway
    return {"http_proxy_host": proxy.host, "http_proxy_port": proxy.port,
            "http_proxy_auth": auth, "proxy_type": "http",
            "http_no_proxy": ["localhost"]}


def make_client(inbox: Inbox, options_verify, request_timeout: float,
                proxy: Optional[netpolicy.Proxy] = None):
    """A python-socketio client whose events all land in the inbox,
    connecting through proxy (None: directly)."""
    import engineio
    import requests
    import socketio

    class OrderedEngineIO(engineio.Client):
        # Deliver messages on the read thread, in order, instead of one new
        # thread per message; handlers only enqueue.  Also note when the
        # server last said anything (pings included) for the liveness guard.
        last_rx = 0.
        def _read_loop_websocket(self):
            self.ws = SizeLimitedSocket(self.ws, MAX_INBOUND_BYTES, inbox)
            super()._read_loop_websocket()
        def _receive_packet(self, pkt):
            self.last_rx = time.monotonic()
            if pkt.packet_type == engineio.packet.MESSAGE:
                handler = self.handlers.get("message")
                try:
                    if handler is not None:
                        handler(pkt.data)
                except Exception as e:
                    # Not even Socket.IO can decode it (say JSON with a
                    # 5,000-digit number): python-engineio would log a
                    # traceback per message; the session logs it once
                    inbox.put_link("undecodable", "%s: %.80s" % (
                        e.__class__.__name__, e))
                return
            super()._receive_packet(pkt)

    class Client(socketio.Client):
        def _engineio_client_class(self):
            return OrderedEngineIO

    http = requests.Session()
    http.trust_env = False          # proxies: netpolicy decides
    if proxy is not None:
        http.proxies = {"http": proxy.url, "https": proxy.url}
    http.verify = options_verify
    sio = Client(reconnection=False, handle_sigint=False, logger=False,
                 engineio_logger=False, request_timeout=request_timeout,
                 http_session=http, ssl_verify=True,
                 websocket_extra_options=websocket_proxy_options(proxy))

    def on_any(event, *args):
        inbox.put_network(event, args[0] if args else None)
    sio.on("*", on_any)
    sio.on("disconnect", lambda *a: inbox.put_link("disconnect"))
    return sio


class Link:
    """One Socket.IO connection; any thread may close it."""

    def __init__(self, sio):
        self.sio = sio
    @classmethod
    def open(cls, factory: Callable, inbox: Inbox, url: str, verify,
             proxy: Optional[netpolicy.Proxy] = None) -> Link:
        """Connect (blocking: the session thread only), through proxy when
        there is one; raises on failure."""
        link = cls(factory(inbox, verify, SOCKET_CONNECT_TIMEOUT, proxy=proxy))
        try:
            link.sio.connect(url, transports=["websocket"],
                             wait_timeout=WELCOME_WAIT)
        except Exception:
            link.close()
            raise
        return link
    @property
    def connected(self) -> bool:
        return bool(self.sio.connected)
    def last_rx(self) -> float:
        """When the cloud last sent anything, pings included."""
        return getattr(getattr(self.sio, "eio", None), "last_rx", 0.)
    def backlog(self) -> int:
        """Packets waiting in python-engineio's (unbounded) send queue."""
        queue = getattr(getattr(self.sio, "eio", None), "queue", None)
        return queue.qsize() if queue is not None else 0
    def emit(self, event: str, data: dict, callback=None) -> None:
        self.sio.emit(event, data, callback=callback)
    def close(self) -> None:
        """End the link at once, from any thread.

        python-engineio's disconnect() joins its read thread, which sits
        in recv() until the server's next ping (25 s on Polar Cloud), and
        a race between two disconnects can leave its write thread waiting
        max(pingInterval, pingTimeout) + 5 s on an empty queue.  So: shut
        the socket down (every blocked recv/send returns), abort without
        joining, and wake the write thread; both threads then end by
        themselves.  The server sees the TCP connection close.
        """
        sio = self.sio
        eio = getattr(sio, "eio", None)
        ws = getattr(eio, "ws", None)
        raw = getattr(ws, "sock", None)
        if raw is not None:
            try:
                raw.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            if eio is not None:
                eio.disconnect(abort=True)
            else:
                sio.disconnect()
        except Exception:
            pass
        try:
            eio.queue.put(None)
        except Exception:
            pass
        if ws is not None:
            try:
                ws.shutdown()
            except Exception:
                pass


def connect_error_text(exc: Exception, url: str,
                       proxy: Optional[netpolicy.Proxy] = None) -> str:
    """What to tell the user about a failed connection attempt."""
    clock = protocol.clock_problem(time.time())
    if clock:
        # The TLS error ("certificate not yet valid") would mislead
        return clock
    text = str(exc) or exc.__class__.__name__
    # python-socketio wraps python-engineio's error, which wraps the ssl
    # error: look down the whole chain
    cause: Optional[BaseException] = exc
    for _ in range(8):
        if cause is None:
            break
        if isinstance(cause, ssl.SSLCertVerificationError) \
                or "CERTIFICATE_VERIFY_FAILED" in str(cause):
            reason = getattr(cause, "verify_message", "") or str(cause)
            return "TLS verification failed: %s" % (reason,)
        cause = cause.__cause__ or cause.__context__
    if proxy is not None and netpolicy.failure_reason(exc):
        return netpolicy.proxy_failure(
            urllib.parse.urlsplit(url).hostname or url, proxy, exc)
    if proxy is not None:
        return "cannot connect to %s through proxy %s: %s" % (
            url, proxy.shown, text)
    return "cannot connect to %s: %s" % (url, text)


def local_ip(url: str, proxy: Optional[netpolicy.Proxy] = None) -> str:
    """The address this host uses to reach url's host, or the proxy it
    goes through (no packet sent)."""
    host = proxy.host if proxy is not None \
        else urllib.parse.urlsplit(url).hostname
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host or "127.0.0.1", 443))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"
