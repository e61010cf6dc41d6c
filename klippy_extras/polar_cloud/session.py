# The cloud session: one supervisor thread owns the Socket.IO connection
#
# Socket.IO handlers only enqueue; this thread handles every event in
# order, owns every state transition, and is the only one that emits.
# Klipper is reached only through the bridge (reactor async callbacks).
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import collections
import logging
import re
import socket
import ssl
import threading
import time
import urllib.parse
from typing import Any, Callable, Optional

from . import camera, protocol
from .backoff import Backoff
from .commands import RemoteCommands
from .gcode_queue import GcodeQueue
from .identity import Identity, IdentityError, IdentityStore
from .jobs import JobManager
from .lab import LabWorkflow
from .pauses import PauseNotes

WELCOME_TIMEOUT = 15.
REPLY_TIMEOUT = 30.
CONNECT_TIMEOUT = 20.
STABLE_AFTER = 60.
LIVENESS_TIMEOUT = 90.
VERSION_INTERVAL = 24 * 3600.
HELLO_CAMERA_WAIT = 3.
AUTH_RETRY_DELAY = 30 * 60.
MAX_NETWORK_QUEUE = 256
# The largest message read from the cloud (a print with a 16 KB download
# URL is far below it); larger ones are dropped before decoding
MAX_INBOUND_BYTES = 1 << 20
OVERSIZED_HEAD = 4096
OVERSIZED_EVENT_RE = re.compile(r'^\d+\[\s*"([A-Za-z_]{1,32})"')
OVERSIZED_JOB_RE = re.compile(r'"jobId"\s*:\s*(?:"([^"\\]{1,128})"|(\d{1,20}))')
# Outbound packets waiting in python-engineio's (unbounded) send queue; on
# a slow link status and other refreshable reports stop here.  Job
# reports always go.
MAX_OUTBOUND_QUEUE = 100
MUST_SEND = frozenset({"job", "hello", "register", "unregister"})

# Session states, as shown by POLAR_STATUS and printer.polar_cloud.state
DISABLED = "disabled"
UNREGISTERED = "unregistered"
CONNECTING = "connecting"
REGISTERING = "registering"
AUTHENTICATING = "authenticating"
ONLINE = "online"
BACKOFF = "backoff"
AUTH_FAILED = "auth_failed"
STOPPED = "stopped"

# Events the cloud may send; anything else is logged once and dropped
CLOUD_EVENTS = {
    "welcome", "registerResponse", "helloResponse", "unregisterResponse",
    "getUrlResponse", "capabilitiesResponse", "print", "pause", "resume",
    "cancel", "delete", "temperature", "command", "customCommand",
    "jogPrinter", "connectPrinter", "update", "sendNextPrintResponse",
    "getQueueResponse", "keyPair",
}

log = logging.getLogger("polar_cloud")


def duration_text(seconds: float) -> str:
    if seconds < 120.:
        return "%d s" % (seconds,)
    if seconds < 7200.:
        return "%d min" % (seconds // 60,)
    return "%.1f h" % (seconds / 3600.,)


class RateLimitedLog:
    """One line per key per period; repeats are counted.  Keys name a
    category of message, never a value the cloud chose; the table is
    bounded all the same."""

    def __init__(self, period: float = 600., max_keys: int = 256):
        self.period = period
        self.max_keys = max_keys
        self.last: dict[str, float] = {}
        self.suppressed: dict[str, int] = collections.Counter()
    def __call__(self, key: str, msg: str, *args, level=logging.INFO,
                 exc_info=None) -> bool:
        """Log unless key was logged within the period; True if logged."""
        now = time.monotonic()
        last = self.last.get(key)
        if last is not None and now - last < self.period:
            self.suppressed[key] += 1
            return False
        if last is None and len(self.last) >= self.max_keys:
            self._forget_old(now)
        self.last[key] = now
        count = self.suppressed.pop(key, 0)
        if count:
            msg += " (%d similar suppressed)" % (count,)
        log.log(level, "polar_cloud: " + msg, *args, exc_info=exc_info)
        return True
    def _forget_old(self, now: float) -> None:
        expired = [k for k, t in self.last.items() if now - t >= self.period]
        if len(expired) < self.max_keys // 2:
            # Still crowded: forget the oldest half
            expired = sorted(self.last, key=self.last.get)[
                :self.max_keys // 2]
        for key in expired:
            del self.last[key]
            self.suppressed.pop(key, None)


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


def make_client(inbox: Inbox, options_verify, request_timeout: float):
    """A python-socketio client whose events all land in the inbox."""
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
    http.verify = options_verify
    sio = Client(reconnection=False, handle_sigint=False, logger=False,
                 engineio_logger=False, request_timeout=request_timeout,
                 http_session=http, ssl_verify=True)

    def on_any(event, *args):
        inbox.put_network(event, args[0] if args else None)
    sio.on("*", on_any)
    sio.on("disconnect", lambda *a: inbox.put_link("disconnect"))
    return sio


class CloudSession:
    def __init__(self, options, bridge, version: str,
                 client_factory: Optional[Callable] = None,
                 backoff: Optional[Backoff] = None):
        self.options = options
        self.bridge = bridge
        self.version = version
        self.store = IdentityStore(options.state_path, options.manufacturer)
        self.client_factory = client_factory or make_client
        self.backoff = backoff or Backoff()
        self.inbox = Inbox()
        self.stop_event = threading.Event()
        self.abandoned = False
        self.thread: Optional[threading.Thread] = None
        self.rlog = RateLimitedLog()
        # Supervisor-thread state
        self.sio = None
        self.identity: Optional[Identity] = None
        self.state = STOPPED
        self.deadline = 0.
        self.retry_at = 0.
        self.challenge = ""
        self.hello_at = 0.
        self.pending_register: Optional[tuple[str, str]] = None
        self.pending_unregister = False
        self.connected_at = 0.
        self.online_at = 0.
        # The current outage, for its summary lines (0: none)
        self.offline_since = 0.
        self.outage_attempts = 0
        self.last_error = ""
        self.last_status: Optional[dict] = None
        self.last_status_key = None
        self.last_status_time = 0.
        self.version_sent_at = 0.
        self.local_ip = "127.0.0.1"
        self.status_count = 0
        self.dropped_seen = 0
        self.snapshot_lock = threading.Lock()
        self.snapshot: Optional[dict] = None
        self.status_now_flag = False
        self.capabilities: list = []
        self.gcode = GcodeQueue(bridge.run_gcode,
                                lambda: self.inbox.put_local(self.gcode.done))
        self.jobs = JobManager(self)
        self.lab = LabWorkflow(self)
        self.pause_notes = PauseNotes(self.console)
        self.commands = RemoteCommands(self)
        self.camera = camera.Camera(
            options.camera, self.loopback_test_server(), self.stop_event,
            lambda result: self.inbox.put_local(self._snapshot_done, result))
        self.last_snapshot: Optional[camera.SnapshotResult] = None
        self.public = self._public_view()
        self.missing: list[str] = []
    # Thread-safe entry points (called from the reactor)
    def start(self, missing: list[str]) -> None:
        self.missing = missing
        self.thread = threading.Thread(target=self._run, name="polar_cloud",
                                       daemon=True)
        self.thread.start()
    def stop(self, timeout: float = 2.) -> None:
        self.stop_event.set()
        self.inbox.wake()
        sio = self.sio
        if sio is not None:
            # Never blocks: this runs on klippy's reactor thread
            self._close(sio)
        if self.thread is not None:
            self.thread.join(timeout)
            if self.thread.is_alive():
                # Stuck in a connect or a DNS lookup: it ends by itself
                # (daemon), but must not touch the state files the next
                # klippy instance has already read
                self.abandoned = True
                log.info("polar_cloud: the old session thread is still"
                         " busy; it will end by itself")
        self.jobs.stop()
        self.camera.stop(timeout)
    def post_snapshot(self, snap: dict, changed: bool) -> None:
        with self.snapshot_lock:
            self.snapshot = snap
        if changed:
            self.inbox.wake()
    def register(self, email: str, pin: str) -> None:
        self.inbox.put_local(self._start_register, email, pin)
    def unregister(self, force: bool) -> None:
        self.inbox.put_local(self._start_unregister, force)
    def request_snapshot(self) -> None:
        self.inbox.put_local(self._manual_snapshot)
    def plate_cleared(self, source: str) -> None:
        self.inbox.put_local(self.lab.plate_cleared, source)
    # The supervisor
    def _run(self) -> None:
        try:
            self._startup()
        except Exception:
            log.exception("polar_cloud: start-up failed")
            self._set_state(DISABLED, "internal error at start-up; see log")
            return
        while not self.stop_event.is_set():
            try:
                item = self.inbox.get(self._wait_time())
                if self.stop_event.is_set():
                    break
                if item is not None:
                    self._handle(*item)
                self._tick(time.monotonic())
            except Exception:
                log.exception("polar_cloud: session error")
                self._drop_connection("internal error")
                self._schedule_retry("internal error; see klippy.log")
        try:
            # A print that ended just before klippy restarts: record (and
            # queue) its report now, the next klippy cannot tell
            if not self.abandoned:
                snap = self._snap()
                self.jobs.watch(snap)
                self.lab.stopping(snap)
        except Exception:
            log.exception("polar_cloud: final job check failed")
        self._drop_connection("stopped")
        self.state = STOPPED
    # Helpers for jobs and commands (session thread)
    def serial(self) -> Optional[str]:
        return self.identity.serial if self.identity else None
    def is_online(self) -> bool:
        return self.state == ONLINE
    def emit(self, event: str, data: dict, callback=None) -> bool:
        return self._emit(event, data, callback)
    def last_rx(self) -> float:
        """When the cloud last sent anything, pings included."""
        sio = self.sio
        return getattr(sio.eio, "last_rx", 0.) if sio is not None else 0.
    def console(self, text: str, error: bool = False,
                log: bool = True) -> None:
        self.bridge.console(text, error=error, log=log)
    def report_failure(self, what: str) -> Callable[[bool, str], None]:
        """A run_gcode reply that tells the console when the script failed."""
        def reply(ok: bool, error: str) -> None:
            if not ok:
                self.bridge.console("Polar Cloud: %s failed: %s"
                                    % (what, error), error=True)
        return reply
    def run_gcode(self, key: str, script: str,
                  reply: Callable[[bool, str], None]) -> None:
        """Run a script on the reactor, one cloud script at a time; a
        newer script with the same key replaces one still waiting."""
        if not self.gcode.submit(key, script, reply):
            self.rlog("gcode-full", "too many cloud commands are waiting for"
                      " klippy; %d dropped so far", self.gcode.dropped,
                      level=logging.WARNING)
    def status_now(self) -> None:
        self.status_now_flag = True
    def publish(self) -> None:
        self._publish()
    def loopback_test_server(self) -> bool:
        """Plain-http loopback job URLs only with a local test cloud."""
        parts = urllib.parse.urlsplit(self.options.server_url)
        return parts.scheme == "http"
    def _snap(self) -> Optional[dict]:
        with self.snapshot_lock:
            return self.snapshot
    def _startup(self) -> None:
        self.lab.load()
        if self.missing:
            self._set_state(DISABLED, "missing Python packages: %s (run"
                            " install.sh)" % (", ".join(self.missing),))
            return
        try:
            self.identity = self.store.load()
        except IdentityError as e:
            self.identity = None
            self._set_state(AUTH_FAILED, str(e))
            self.bridge.console("Polar Cloud: %s" % (e,), error=True)
            return
        if self.identity is None:
            self._set_state(UNREGISTERED, "")
            return
        self.jobs.load()
        # Probe the camera first so the first hello can tell the cloud
        now = time.monotonic()
        if self.camera.due("idle", now):
            self.camera.start("idle", protocol.NO_JOB_ID, now)
        self._connect()
    def _wait_time(self) -> float:
        now = time.monotonic()
        waits = [1.]
        if self.state in (CONNECTING, REGISTERING, AUTHENTICATING):
            waits.append(self.deadline - now)
        elif self.state == BACKOFF:
            waits.append(self.retry_at - now)
        return max(0., min(waits))
    def _tick(self, now: float) -> None:
        dropped = self.inbox.dropped
        if dropped != self.dropped_seen:
            self.dropped_seen = dropped
            self.rlog("flood", "the cloud sent more events than can be"
                      " handled; %d dropped", dropped, level=logging.WARNING)
        snap = self._snap()
        self.jobs.watch(snap)
        self.lab.watch(snap)
        self.pause_notes.watch(snap)
        state = self.state
        if self.hello_at and state == CONNECTING and (
                now >= self.hello_at or not self.camera.probing()):
            self.hello_at = 0.
            self._send_hello()
            state = self.state
        if state in (CONNECTING, REGISTERING, AUTHENTICATING) \
                and now >= self.deadline:
            what = {CONNECTING: "no welcome from Polar Cloud",
                    REGISTERING: "no reply to the registration",
                    AUTHENTICATING: "no reply to hello"}[state]
            self._fail(what)
        elif state in (BACKOFF, AUTH_FAILED) and self.identity is not None \
                and self.retry_at and now >= self.retry_at:
            # auth_failed retries only after AUTH_RETRY_DELAY
            self._connect()
        elif state == ONLINE:
            self._check_link(now)
            if self.state == ONLINE:
                self._online_work(now)
    def _check_link(self, now: float) -> None:
        sio = self.sio
        if sio is None or not sio.connected:
            self._fail("connection lost")
            return
        last_rx = getattr(sio.eio, "last_rx", 0.)
        if last_rx and now - last_rx > LIVENESS_TIMEOUT:
            self._fail("no traffic from Polar Cloud for %d s"
                       % (LIVENESS_TIMEOUT,))
            return
        if self.online_at and now - self.online_at > STABLE_AFTER:
            self.backoff.reset()
    # Connection management
    def _connect(self) -> None:
        if self.stop_event.is_set():
            return
        self._drop_connection("reconnect")
        self._set_state(CONNECTING, self.last_error)
        self.challenge = ""
        self.hello_at = 0.
        sio = self.client_factory(self.inbox, self.options.ca_file or True,
                                  CONNECT_TIMEOUT)
        self.sio = sio
        try:
            sio.connect(self.options.server_url, transports=["websocket"],
                        wait_timeout=10)
        except Exception as e:
            self.sio = None
            self._close(sio)
            self._schedule_retry(self._connect_error_text(e))
            return
        if self.stop_event.is_set():
            self._drop_connection("stopped")
            return
        self.connected_at = time.monotonic()
        self.deadline = self.connected_at + WELCOME_TIMEOUT
        self.local_ip = self._find_local_ip()
        self.rlog("connected", "connected to %s", self.options.server_url)
    def _connect_error_text(self, exc: Exception) -> str:
        clock = protocol.clock_problem(time.time())
        if clock:
            # The TLS error ("certificate not yet valid") would mislead
            return clock
        text = str(exc) or exc.__class__.__name__
        # python-socketio wraps python-engineio's error, which wraps the
        # ssl error: look down the whole chain
        cause: Optional[BaseException] = exc
        for _ in range(8):
            if cause is None:
                break
            if isinstance(cause, ssl.SSLCertVerificationError) \
                    or "CERTIFICATE_VERIFY_FAILED" in str(cause):
                reason = getattr(cause, "verify_message", "") or str(cause)
                return "TLS verification failed: %s" % (reason,)
            cause = cause.__cause__ or cause.__context__
        return "cannot connect to %s: %s" % (self.options.server_url, text)
    def _find_local_ip(self) -> str:
        host = urllib.parse.urlsplit(self.options.server_url).hostname
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((host or "127.0.0.1", 443))
                return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"
    def _close(self, sio) -> None:
        """End a link at once, from any thread.

        python-engineio's disconnect() joins its read thread, which sits
        in recv() until the server's next ping (25 s on Polar Cloud), and
        a race between two disconnects can leave its write thread waiting
        max(pingInterval, pingTimeout) + 5 s on an empty queue.  So: shut
        the socket down (every blocked recv/send returns), abort without
        joining, and wake the write thread; both threads then end by
        themselves.  The server sees the TCP connection close.
        """
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
    def _drop_connection(self, why: str) -> None:
        sio, self.sio = self.sio, None
        if sio is not None:
            self._close(sio)
        self.online_at = 0.
        if why != "stopped":
            # A clean stop delivers what was sent; a lost link may not have
            self.jobs.link_lost()
    def _fail(self, why: str) -> None:
        """A connection attempt or live session ended; retry later."""
        was_online = self.state == ONLINE
        self._drop_connection(why)
        if self.pending_register is not None:
            self._finish_register(False, "registration failed: %s" % (why,))
            return
        if was_online:
            self.bridge.console("Polar Cloud: connection lost (%s);"
                                " reconnecting" % (why,), log=False)
        self._schedule_retry(why)
    def _schedule_retry(self, why: str) -> None:
        if self.identity is None:
            self._set_state(UNREGISTERED, why)
            return
        delay = self.backoff.next_delay()
        now = time.monotonic()
        self.retry_at = now + delay
        if not self.offline_since:
            self.offline_since, self.outage_attempts = now, 0
        self.outage_attempts += 1
        self._set_state(BACKOFF, why)
        # Repeats of the same reason are one line per 10 minutes, which
        # then says how long the outage has lasted
        outage = ""
        if now - self.offline_since >= 60.:
            outage = " (offline for %s, %d attempts)" % (
                duration_text(now - self.offline_since), self.outage_attempts)
        self.rlog("retry:" + why[:40], "%s; retry in %.0f s%s", why, delay,
                  outage, level=logging.WARNING)
    def _emit(self, event: str, data: dict, callback=None) -> bool:
        sio = self.sio
        if sio is None:
            return False
        queue = getattr(getattr(sio, "eio", None), "queue", None)
        if event not in MUST_SEND and queue is not None \
                and queue.qsize() >= MAX_OUTBOUND_QUEUE:
            self.rlog("slow", "the link to Polar Cloud is slow; %s not"
                      " sent", event, level=logging.WARNING)
            return False
        try:
            sio.emit(event, data, callback=callback)
        except Exception as e:
            self.rlog("emit", "emit %s failed: %s", event, e,
                      level=logging.WARNING)
            return False
        if self.options.verbose and event not in ("status",):
            log.info("polar_cloud: sent %s", event)
        return True
    # Event dispatch
    def _handle(self, kind: str, name, data) -> None:
        if kind == CALL:
            name(*data)
        elif kind == LINK:
            self._link_news(name, data)
        else:
            self._dispatch(name, data)
    def _link_news(self, name: str, data: Any) -> None:
        if name == "disconnect":
            if self.sio is not None and not self.sio.connected:
                self._fail("disconnected by Polar Cloud")
        elif name == "oversized":
            self._oversized(*data)
        elif name == "undecodable":
            self.rlog("undecodable", "dropped a message from the cloud that"
                      " cannot be decoded (%s)", data, level=logging.WARNING)
    def _oversized(self, size: int, head: str) -> None:
        event = OVERSIZED_EVENT_RE.match(head)
        name = event.group(1) if event else "?"
        self.rlog("oversized", "dropped a %d-byte '%s' message from the"
                  " cloud (the limit is %d bytes)", size, name,
                  MAX_INBOUND_BYTES, level=logging.WARNING)
        job = OVERSIZED_JOB_RE.search(head)
        if name == "print" and job and self.state == ONLINE:
            # Still answer the job, so it does not hang in the cloud
            self.jobs.refuse_unread(job.group(1) or job.group(2),
                                    "the print message is too large")
    def _dispatch(self, name: str, data: Any) -> None:
        """A cloud event: only the names in CLOUD_EVENTS are handled."""
        if name in CLOUD_EVENTS:
            if self.options.verbose:
                log.info("polar_cloud: received %s", name)
            handler = getattr(self, "_on_" + name, None)
            if name not in ("welcome", "registerResponse", "helloResponse") \
                    and self.state != ONLINE:
                self.rlog("early:" + name, "ignoring '%s' before the printer"
                          " is authenticated", name)
                return
            if handler is None:
                self.rlog("ignored:" + name, "ignoring '%s' from the cloud"
                          " (not supported)", name)
                return
            try:
                handler(data)
            except protocol.ProtocolError as e:
                self.rlog("bad:" + name, "dropped malformed '%s': %s",
                          name, e, level=logging.WARNING)
            except Exception:
                # A message we could not handle says nothing about the
                # link: drop the message, keep the session
                self.rlog("failed:" + name, "could not handle '%s' from the"
                          " cloud; dropped", name, level=logging.WARNING,
                          exc_info=True)
        else:
            self.rlog("unknown", "ignoring unknown event from the cloud:"
                      " %.32r", name, level=logging.WARNING)
    def _on_welcome(self, data: Any) -> None:
        if self.state != CONNECTING:
            return
        self.challenge = protocol.parse_welcome(data)
        if self.pending_register is not None:
            self._send_register()
        elif self.identity is not None:
            if self.camera.probing():
                # Let the hello say whether there is a camera
                self.hello_at = time.monotonic() + HELLO_CAMERA_WAIT
            else:
                self._send_hello()
        else:
            self._drop_connection("unregistered")
            self._set_state(UNREGISTERED, "")
    # Registration
    def _start_register(self, email: str, pin: str) -> None:
        if self.state == DISABLED:
            return
        self.pending_register = (email, pin)
        self.identity = None
        self.backoff.reset()
        self.bridge.console("Polar Cloud: preparing the printer key...",
                            log=False)
        try:
            try:
                key = self.store.load_key()
            except IdentityError as e:
                # An explicit registration may replace an unusable key
                log.warning("polar_cloud: replacing the printer key: %s", e)
                key = None
            if key is None:
                self.store.create_key()
            self.store.save_machine()
            now = time.monotonic()
            if self.camera.due("idle", now):
                self.camera.start("idle", protocol.NO_JOB_ID, now)
        except IdentityError as e:
            self._finish_register(False, str(e))
            return
        self._connect()
        if self.state == BACKOFF or self.sio is None:
            self._finish_register(False, self.last_error)
    def _send_register(self) -> None:
        email, pin = self.pending_register
        machine = self.store.machine()
        msg = protocol.build_register(
            self.options.manufacturer, email, pin, self.store.public_pem(),
            machine["mfg_sn"], machine["mac"],
            self.options.machine_type, self.options.printer_make)
        self._set_state(REGISTERING, "")
        self.deadline = time.monotonic() + REPLY_TIMEOUT
        # The PIN leaves memory with this message
        self.pending_register = ("", "")
        self._emit("register", msg)
    def _on_registerResponse(self, data: Any) -> None:
        if self.state != REGISTERING:
            return
        result = protocol.parse_register_response(data)
        if not result.ok:
            if result.reason in ("NO_SERIAL", "MALFORMED"):
                log.warning("polar_cloud: unexpected registerResponse shape"
                            " (%s)", sorted(data) if isinstance(data, dict)
                            else type(data).__name__)
            self._drop_connection("registration failed")
            self._finish_register(False, result.message)
            return
        try:
            self.identity = self.store.save(result.serial,
                                            self.options.server_url)
        except (IdentityError, OSError) as e:
            self._drop_connection("registration failed")
            self._finish_register(False, "cannot save the identity: %s" % e)
            return
        self._finish_register(True, result.serial)
        # The protocol wants a fresh connection for the hello
        self._connect()
    def _finish_register(self, ok: bool, detail: str) -> None:
        self.pending_register = None
        if ok:
            self.last_error = ""
            self.bridge.console("Polar Cloud: registered, serial number %s;"
                                " connecting" % (detail,))
            log.info("polar_cloud: registered as %s", detail)
            return
        self._drop_connection("registration failed")
        self.identity = None
        self._set_state(UNREGISTERED, detail)
        self.bridge.console("Polar Cloud registration failed: %s" % (detail,),
                            error=True)
        log.warning("polar_cloud: registration failed: %s", detail)
    def _start_unregister(self, force: bool) -> None:
        if self.identity is None:
            self.bridge.console("Polar Cloud: this printer is not registered")
            return
        if self.state != ONLINE:
            if not force:
                self.bridge.console(
                    "Polar Cloud is not reachable, so the printer stays"
                    " registered. POLAR_UNREGISTER FORCE=1 forgets it on this"
                    " printer only (then delete it on polar3d.com).",
                    error=True)
                return
            self._forget("unregistered on this printer only")
            return
        self.pending_unregister = True
        self._emit("unregister", {"serialNumber": self.identity.serial})
        self.deadline = time.monotonic() + REPLY_TIMEOUT
    def _on_unregisterResponse(self, data: Any) -> None:
        if not self.pending_unregister:
            return
        self.pending_unregister = False
        ok, message = protocol.parse_status_reply(data, "unregisterResponse")
        if not ok:
            self.bridge.console("Polar Cloud refused to unregister: %s"
                                % (message or "no reason given"), error=True)
            return
        self._forget("unregistered")
    def _forget(self, why: str) -> None:
        serial = self.identity.serial if self.identity else "?"
        try:
            self.store.wipe()
        except (IdentityError, OSError) as e:
            log.warning("polar_cloud: cannot wipe identity: %s", e)
        self.identity = None
        self.camera.forget_urls()
        self._drop_connection(why)
        self._set_state(UNREGISTERED, "")
        self.bridge.console("Polar Cloud: printer %s %s" % (serial, why))
        log.info("polar_cloud: printer %s %s", serial, why)
    # Authentication
    def _send_hello(self) -> None:
        ident = self.identity
        msg = protocol.build_hello(
            ident.serial, self.store.sign(self.challenge), ident.mac,
            ident.mfg_sn, self.options.printer_make, self.version,
            self.local_ip, camera.camera_hints(
                self.options.camera, self.local_ip,
                self.camera.available() is True))
        self._set_state(AUTHENTICATING, self.last_error)
        self.deadline = time.monotonic() + REPLY_TIMEOUT
        self._emit("hello", msg)
    def _on_helloResponse(self, data: Any) -> None:
        if self.state != AUTHENTICATING:
            return
        status, message = protocol.parse_hello_response(data)
        if status == "SUCCESS":
            self.online_at = time.monotonic()
            self.last_status_key = None
            self._set_state(ONLINE, "")
            if self.offline_since:
                log.info("polar_cloud: online as %s after %s offline"
                         " (%d attempts)", self.identity.serial,
                         duration_text(self.online_at - self.offline_since),
                         self.outage_attempts)
                self.offline_since = 0.
            else:
                log.info("polar_cloud: online as %s", self.identity.serial)
            self.bridge.console("Polar Cloud: online as %s"
                                % (self.identity.serial,), log=False)
            self._send_version(self.online_at)
            self._emit("capabilities", {"serialNumber": self.identity.serial})
            if self.commands.command_list():
                self._emit("customCommandList", {
                    "serialNumber": self.identity.serial,
                    "commandList": self.commands.command_list()})
            self.jobs.flush()
            return
        if status == "DELETED":
            self._forget("was deleted in Polar Cloud; register it again"
                         " with POLAR_REGISTER")
            self.last_error = "printer deleted in Polar Cloud"
            self._publish()
            return
        # A rejected hello rarely clears by itself: retry after a long pause
        self._drop_connection("hello rejected")
        self.retry_at = time.monotonic() + AUTH_RETRY_DELAY
        self._set_state(AUTH_FAILED, "Polar Cloud rejected the printer: %s"
                        % (message,))
        self.bridge.console("Polar Cloud rejected the printer: %s" % (message,),
                            error=True)
    # Cloud commands
    def _on_print(self, data: Any) -> None:
        self.jobs.handle_print(data, self._snap())
    def _on_pause(self, data: Any) -> None:
        self.jobs.control("pause", data, self._snap())
    def _on_resume(self, data: Any) -> None:
        self.jobs.control("resume", data, self._snap())
    def _on_cancel(self, data: Any) -> None:
        self.jobs.control("cancel", data, self._snap())
    def _on_temperature(self, data: Any) -> None:
        self.commands.temperature(data, self._snap())
    def _on_command(self, data: Any) -> None:
        self.commands.raw_gcode(data, self._snap())
    def _on_customCommand(self, data: Any) -> None:
        self.commands.custom_command(data, self._snap())
    def _on_jogPrinter(self, data: Any) -> None:
        self.commands.jog(data, self._snap())
    def _on_connectPrinter(self, data: Any) -> None:
        self.commands.refuse("connectPrinter")
    def _on_update(self, data: Any) -> None:
        # Updates come through Moonraker's update_manager, never the cloud
        self.commands.refuse("update")
    def _on_getUrlResponse(self, data: Any) -> None:
        self.camera.set_slot(camera.parse_url_response(
            data, self.serial(), self.loopback_test_server(),
            time.monotonic()))
    def _on_capabilitiesResponse(self, data: Any) -> None:
        if isinstance(data, dict) and isinstance(data.get("capabilities"),
                                                 list):
            self.capabilities = [c for c in data["capabilities"][:32]
                                 if isinstance(c, str)]
            self.lab.capabilities(self.capabilities)
    def _on_delete(self, data: Any) -> None:
        if isinstance(data, dict):
            protocol.check_serial(data, self.identity and self.identity.serial,
                                  "delete")
        self._forget("was deleted in Polar Cloud; register it again with"
                     " POLAR_REGISTER")
        self.last_error = "printer deleted in Polar Cloud"
        self._publish()
    # Online work: status and version reports
    def _online_work(self, now: float) -> None:
        if self.pending_unregister and now >= self.deadline:
            self.pending_unregister = False
            self.bridge.console("Polar Cloud did not answer the unregister"
                                " request; the printer stays registered",
                                error=True)
        if now - self.version_sent_at > VERSION_INTERVAL:
            self._send_version(now)
        self.jobs.flush()
        self.lab.online_work()
        self._maybe_send_status(now)
        self._snapshot_work(now)
    # Webcam snapshots
    def _snapshot_kind(self) -> tuple[str, str]:
        job = self.jobs.view()
        if job is not None and job.phase in ("downloading", "starting",
                                             "printing"):
            return "printing", job.job_id
        return "idle", protocol.NO_JOB_ID
    def _snapshot_work(self, now: float) -> None:
        kind, job_id = self._snapshot_kind()
        cam = self.camera
        if cam.needs_url(kind, job_id, now) and self._emit("getUrl", {
                "serialNumber": self.identity.serial, "method": "post",
                "type": kind, "jobId": job_id}):
            cam.url_requested(kind, job_id, now)
        if cam.due(kind, now, job_id):
            cam.start(kind, job_id, now)
    def _manual_snapshot(self) -> None:
        kind, job_id = self._snapshot_kind()
        if not self.camera.start(kind, job_id, time.monotonic(), manual=True):
            self.bridge.console("Polar Cloud: a snapshot is already running"
                                " (or the session is stopping)")
    def _snapshot_done(self, result: camera.SnapshotResult) -> None:
        self.last_snapshot = result
        if not result.manual:
            return
        if result.fetched:
            text = "snapshot %d bytes, %d bytes after processing" % (
                result.fetched, result.final)
        else:
            text = "no snapshot"
        if result.uploaded:
            text += "; uploaded to Polar Cloud"
        elif result.error:
            text += "; %s" % (result.error,)
        else:
            text += "; not uploaded (no upload URL yet)"
        self.bridge.console("Polar Cloud: " + text, error=not result.ok)
    def _send_version(self, now: float) -> None:
        self.version_sent_at = now
        self._emit("setVersion", {"serialNumber": self.identity.serial,
                                  "runningVersion": self.version})
    def _status_message(self) -> Optional[dict]:
        snap = self._snap()
        if snap is None:
            return None
        job = self.jobs.view(snap)
        code = protocol.status_code(snap, job, self.lab.plate_clear)
        job_id = protocol.status_job_id(snap, job, code)
        return protocol.build_status(
            self.identity.serial, snap, code, job_id,
            slicer_estimate=self.jobs.slicer_estimate(snap),
            error_text=snap.get("state_message", ""))
    def _maybe_send_status(self, now: float) -> None:
        msg = self._status_message()
        if msg is None:
            return
        targets = tuple(v for k, v in sorted(msg.items())
                        if k.startswith("target"))
        key = (msg["status"], msg["jobId"], targets)
        active = msg["status"] not in (protocol.IDLE, protocol.OFFLINE,
                                       protocol.ERROR, protocol.CLEAR_PLATE) \
            or any(targets)
        interval = (self.options.active_interval if active
                    else self.options.status_interval)
        if key == self.last_status_key and not self.status_now_flag \
                and now - self.last_status_time < interval:
            return
        self.status_now_flag = False
        if self._emit("status", msg):
            self.jobs.status_sent(msg["status"])
            self.status_count += 1
            self.last_status_key = key
            self.last_status_time = now
            self.last_status = msg
            self._publish()
    # Public view for get_status / POLAR_STATUS
    def _set_state(self, state: str, error: str) -> None:
        changed = state != self.state or error != self.last_error
        if state in (UNREGISTERED, DISABLED, STOPPED):
            self.offline_since = 0.
        self.state = state
        self.last_error = error
        if changed:
            self._publish()
            if state == BACKOFF:
                pass        # _schedule_retry logs the reason and the delay
            elif error and state != CONNECTING:
                self.rlog("state:" + state + error[:40], "%s: %s", state,
                          error)
            elif state == CONNECTING:
                # Every reconnect passes here: an outage is summed up by
                # its retry lines instead
                if not self.offline_since:
                    self.rlog("state:" + state, "%s", state)
            else:
                log.info("polar_cloud: %s", state)
    def _public_view(self) -> dict:
        ident = self.identity
        last = self.last_status or {}
        return {
            "state": self.state,
            "connected": self.state == ONLINE,
            "registered": ident is not None,
            "serial_number": ident.serial if ident else "",
            "server": self.options.server_url,
            "online_since": (protocol.utc_iso(time.time() - (
                time.monotonic() - self.online_at)) if self.online_at
                else ""),
            "last_error": self.last_error,
            "job_id": last.get("jobId", protocol.NO_JOB_ID)
            if self.state == ONLINE else protocol.NO_JOB_ID,
            "status_code": last.get("status", -1)
            if self.state == ONLINE else -1,
            "retry_in": max(0, int(self.retry_at - time.monotonic()))
            if self.state == BACKOFF else 0,
            "retries": self.backoff.attempts if self.state != ONLINE
            else 0,
            "plate_clear": self.lab.plate_clear,
            "next_print": self.lab.next_print,
        }
    def _publish(self) -> None:
        self.public = self._public_view()
