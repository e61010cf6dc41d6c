# The cloud session: one supervisor thread and its state machine
#
# The thread handles every cloud event and every request from klippy in
# order (they arrive through the link's Inbox), owns every state
# transition, and is the only one that emits.  Klippy is reached only
# through the bridge (reactor async callbacks).  Collaborators register
# the cloud events they own with on(); see docs/architecture.md.  The
# connection itself is connection.py's, the public view status_view.py's,
# the hand-over at RESTART takeover.py's.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from typing import Any, Callable, Optional

from . import children
from . import link as links
from .auth import Auth
from .backoff import Backoff
from .commands import RemoteCommands
from .connection import CloudConnection
from .dispatch import Dispatcher, Handler
from .gcode_queue import GcodeQueue
from .identity import Identity, IdentityError, IdentityStore
from .jobs import JobManager
from .lab import LabWorkflow
from .outage import Outage
from .pauses import PauseNotes
from .ratelog import RateLimitedLog
from .reporting import Reporter
from .snapshots import Snapshots
from .states import (
    AUTH_FAILED,
    BACKOFF,
    CONNECTING,
    DISABLED,
    ONLINE,
    STOPPED,
    UNREGISTERED,
    WAITING,
)
from .status_view import public_view
from .takeover import take_over
from .timelapse import Timelapse
from .webcams import Webcams

log = logging.getLogger("polar_cloud")


class CloudSession(CloudConnection):
    def __init__(self, options, bridge, version: str,
                 client_factory: Optional[Callable] = None,
                 backoff: Optional[Backoff] = None):
        self.options = options
        self.bridge = bridge
        self.version = version
        self.client_factory = client_factory or links.make_client
        self.backoff = backoff or Backoff()
        self.inbox = links.Inbox()
        self.stop_event = threading.Event()
        self.abandoned = False
        self.thread: Optional[threading.Thread] = None
        self.rlog = RateLimitedLog()
        self.dispatcher = Dispatcher(self.rlog, options.verbose)
        # Supervisor-thread state
        self.identity: Optional[Identity] = None
        self.state = STOPPED
        self.outage = Outage(self.rlog)
        self.last_error = ""
        self.dropped_seen = 0
        self.snapshot_lock = threading.Lock()
        self.latest_sample: Optional[dict] = None
        self.missing: list[str] = []
        self._init_connection(options.server_url)
        # Collaborators; each registers the cloud events it owns
        self._handlers = {links.CALL: self._call, links.LINK: self._link_news,
                          links.CLOUD: self._dispatch}
        self.on("welcome", self.on_welcome, online=False)
        self.on("capabilitiesResponse", self.on_capabilities)
        self.gcode = GcodeQueue(bridge.run_gcode,
                                lambda: self.post(self.gcode.done))
        self.jobs = JobManager(self)
        self.lab = LabWorkflow(self)
        self.pause_notes = PauseNotes(self.console)
        self.reporter = Reporter(self, self.jobs)
        self.commands = RemoteCommands(self)
        self.snapshots = Snapshots(self, self.jobs)
        self.camera = self.snapshots.camera
        self.timelapse = Timelapse(self)
        self.webcams = Webcams(self)
        self.reporter.status_filter = self.timelapse.status_code
        self.snapshots.timelapse = self.timelapse
        self.auth = Auth(self, IdentityStore(options.state_path,
                                             options.manufacturer))
        self.public = public_view(self)
    @property
    def store(self) -> IdentityStore:
        return self.auth.store
    @store.setter
    def store(self, store: IdentityStore) -> None:
        self.auth.store = store
    # Thread-safe entry points (called from the reactor)
    def start(self, missing: list[str]) -> None:
        self.missing = missing
        self.thread = threading.Thread(target=self._run, name="polar_cloud",
                                       daemon=True)
        self.thread.start()
    def stop(self) -> None:
        """Never blocks (klippy:disconnect): every thread is told to stop
        and ends by itself; the next session waits for this one's last
        writes on its own thread."""
        self.stop_event.set()
        self.inbox.wake()
        link = self.link
        if link is not None:
            link.close()
        self.jobs.stop()
        self.camera.stop(0.)
        self.timelapse.stop(0.)
        self.webcams.stop(0.)
    def post_snapshot(self, snap: dict, changed: bool) -> None:
        with self.snapshot_lock:
            self.latest_sample = snap
        if changed:
            self.inbox.wake()
    def register(self, email: str, pin: str) -> None:
        self.post(self.auth.start_register, email, pin)
    def unregister(self, force: bool) -> None:
        self.post(self.auth.start_unregister, force)
    def request_snapshot(self) -> None:
        self.post(self.snapshots.manual)
    def plate_cleared(self, source: str) -> None:
        self.post(self.lab.plate_cleared, source)
    # What collaborators may ask (session thread, unless noted)
    def on(self, event: str, handler: Handler, online: bool = True) -> None:
        """Handle a cloud event; online: only once authenticated."""
        self.dispatcher.on(event, handler, online)
    def post(self, fn: Callable, *args) -> None:
        """Run fn(*args) on the session thread (any thread may call)."""
        self.inbox.put_local(fn, *args)
    def snapshot(self) -> Optional[dict]:
        """The latest sample of the printer (printer_state.py)."""
        with self.snapshot_lock:
            return self.latest_sample
    def serial(self) -> Optional[str]:
        return self.identity.serial if self.identity else None
    def is_online(self) -> bool:
        return self.state == ONLINE
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
        self.reporter.status_now()
    def loopback_test_server(self) -> bool:
        """Plain-http loopback job URLs only with a local test cloud."""
        parts = urllib.parse.urlsplit(self.options.server_url)
        return parts.scheme == "http"
    # The supervisor
    def _run(self) -> None:
        try:
            take_over(self)
            children.start_host()
            self._startup()
        except Exception:
            log.exception("polar_cloud: start-up failed")
            self.set_state(DISABLED, "internal error at start-up; see log")
            return
        while not self.stop_event.is_set():
            try:
                self.step(self._wait_time())
            except Exception:
                log.exception("polar_cloud: session error")
                self.drop_connection("internal error")
                self._schedule_retry("internal error; see klippy.log")
        try:
            # A print that ended just before klippy restarts: record (and
            # queue) its report now, the next klippy cannot tell
            if not self.abandoned:
                sample = self.snapshot()
                self.jobs.watch(sample)
                self.lab.stopping(sample)
        except Exception:
            log.exception("polar_cloud: final job check failed")
        self.drop_connection("stopped")
        self.state = STOPPED
    def step(self, timeout: float) -> None:
        """One turn of the supervisor: the next inbox entry (waiting up to
        timeout for one), then the periodic work."""
        item = self.inbox.get(timeout)
        if self.stop_event.is_set():
            return
        if item is not None:
            self._handle(*item)
        self._tick(time.monotonic())
    def _startup(self) -> None:
        self.lab.load()
        if self.missing:
            self.set_state(DISABLED, "missing Python packages: %s (run"
                           " install.sh)" % (", ".join(self.missing),))
            return
        self.webcams.refresh()
        try:
            self.identity = self.store.load()
        except IdentityError as e:
            self.identity = None
            self.set_state(AUTH_FAILED, str(e))
            self.console("Polar Cloud: %s" % (e,), error=True)
            return
        if self.identity is None:
            self.set_state(UNREGISTERED, "")
            return
        self.jobs.load()
        # Probe the camera first so the first hello can tell the cloud
        self.snapshots.probe()
        self.connect()
    def _wait_time(self) -> float:
        now = time.monotonic()
        waits = [1.]
        for at in (self.connect_at, self.hello_at):
            if at:
                waits.append(at - now)
        if self._awaiting_reply(self.state):
            waits.append(self.deadline - now)
        elif self.state == BACKOFF:
            waits.append(self.retry_at - now)
        return max(0., min(waits))
    def _awaiting_reply(self, state: str) -> bool:
        """Is a reply deadline running?  Not while a scheduled connection
        waits to be made, nor once the welcome came: a hello held back
        for the camera probe goes out at hello_at whatever happens, with
        its own deadline from then."""
        if state == CONNECTING and (self.connect_at or self.challenge):
            return False
        return state in WAITING
    def _tick(self, now: float) -> None:
        dropped = self.inbox.dropped
        if dropped != self.dropped_seen:
            self.dropped_seen = dropped
            self.rlog("flood", "the cloud sent more events than can be"
                      " handled; %d dropped", dropped, level=logging.WARNING)
        sample = self.snapshot()
        self.jobs.watch(sample)
        self.lab.watch(sample)
        self.pause_notes.watch(sample)
        self.timelapse.tick(now, sample)
        state = self.state
        if self.connect_at and now >= self.connect_at:
            self.connect()
            state = self.state
        elif self.hello_at and state == CONNECTING and (
                now >= self.hello_at or not self.camera.probing()):
            self.hello_at = 0.
            self.auth.send_hello(self.challenge)
            state = self.state
        if self._awaiting_reply(state) and now >= self.deadline:
            self._fail(WAITING[state])
        elif state in (BACKOFF, AUTH_FAILED) and self.retry_at \
                and now >= self.retry_at and (
                    self.identity is not None
                    or self.auth.pending_register is not None):
            # auth_failed retries only after auth.AUTH_RETRY_DELAY; a
            # registration only after SERVER_ERROR
            self.connect()
        elif state == ONLINE:
            self._check_link(now)
            if self.state == ONLINE:
                self._online_work(now)
        self.auth.poll_handoff(now)
    def _online_work(self, now: float) -> None:
        self.auth.check_unregister(now)
        self.reporter.work(now)
        self.jobs.flush()
        self.lab.online_work()
        self.snapshots.work(now)
        self.timelapse.online_work(now)
    # Inbox entries: calls, link news and cloud events
    def _handle(self, kind: str, name, data) -> None:
        self._handlers[kind](name, data)
    def _call(self, fn: Callable, args: tuple) -> None:
        fn(*args)
    def _dispatch(self, name: str, data: Any) -> None:
        self.dispatcher.dispatch(name, data, self.state == ONLINE)
    # The state, and what get_status shows of it (status_view.py)
    def set_state(self, state: str, error: str) -> None:
        changed = state != self.state or error != self.last_error
        if state != CONNECTING:
            self.connect_at = 0.
        if state in (UNREGISTERED, DISABLED, STOPPED):
            self.outage.forget()
        self.state = state
        self.last_error = error
        if not changed:
            return
        self.publish()
        if state == BACKOFF:
            pass        # _schedule_retry logs the reason and the delay
        elif error and state != CONNECTING:
            self.rlog("state:" + state + error[:40], "%s: %s", state, error)
        elif state == CONNECTING:
            # Every reconnect passes here: an outage is summed up by its
            # retry lines instead
            if not self.outage.since:
                self.rlog("state:" + state, "%s", state)
        else:
            log.info("polar_cloud: %s", state)
    def publish(self) -> None:
        self.public = public_view(self)
    def retry_in(self) -> int:
        """Seconds to the next attempt while in backoff (any thread)."""
        if self.state != BACKOFF:
            return 0
        return max(0, int(self.retry_at - time.monotonic()))
