# The connection to Polar Cloud, for the session's supervisor
#
# CloudSession (session.py) is built on CloudConnection: opening the link
# and the welcome, the deadlines while the cloud's answer is awaited,
# liveness, dropping the link and scheduling the next attempt, and the
# link's own news (a disconnect, an oversized or undecodable message).
# Everything here runs on the session thread; emit is the one place that
# sends.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import logging
import time
from typing import Any, Optional

from . import inbound, netpolicy
from . import link as links
from .states import BACKOFF, CONNECTING, ONLINE, UNREGISTERED

WELCOME_TIMEOUT = 15.
STABLE_AFTER = 60.
LIVENESS_TIMEOUT = 90.
HELLO_CAMERA_WAIT = 3.
# Outbound packets waiting in python-engineio's (unbounded) send queue; on
# a slow link status and other refreshable reports stop here.  Job
# reports always go.
MAX_OUTBOUND_QUEUE = 100
MUST_SEND = frozenset({"job", "hello", "register", "unregister"})

log = logging.getLogger("polar_cloud")


class CloudConnection:
    """The connection half of CloudSession (which provides state,
    set_state, the collaborators and the options)."""

    def _init_connection(self, server_url: str) -> None:
        self.link: Optional[links.Link] = None
        self.deadline = 0.
        self.retry_at = 0.
        # A connection scheduled without a failure (after a registration)
        self.connect_at = 0.
        self.hello_at = 0.
        self.challenge = ""
        self.connected_at = 0.
        self.online_at = 0.
        self.local_ip = "127.0.0.1"
        self.capabilities: list = []
        self._news = {"disconnect": self._disconnected,
                      "oversized": self._oversized,
                      "undecodable": self._undecodable}
        # The proxy to Polar Cloud, from the environment (which does not
        # change while klippy runs); an unusable one is every connect's
        # error
        self.proxy: Optional[netpolicy.Proxy] = None
        self.proxy_problem = ""
        try:
            self.proxy = netpolicy.proxy_for(server_url)
        except netpolicy.ProxyError as e:
            self.proxy_problem = str(e)
    def emit(self, event: str, data: dict, callback=None) -> bool:
        link = self.link
        if link is None:
            return False
        if event not in MUST_SEND and link.backlog() >= MAX_OUTBOUND_QUEUE:
            self.rlog("slow", "the link to Polar Cloud is slow; %s not"
                      " sent", event, level=logging.WARNING)
            return False
        try:
            link.emit(event, data, callback=callback)
        except Exception as e:
            self.rlog("emit", "emit %s failed: %s", event, e,
                      level=logging.WARNING)
            return False
        if self.options.verbose and event not in ("status",):
            log.info("polar_cloud: sent %s", event)
        return True
    def last_rx(self) -> float:
        link = self.link
        return link.last_rx() if link is not None else 0.
    def _check_link(self, now: float) -> None:
        link = self.link
        if link is None or not link.connected:
            self._fail("connection lost")
            return
        last_rx = link.last_rx()
        if last_rx and now - last_rx > LIVENESS_TIMEOUT:
            self._fail("no traffic from Polar Cloud for %d s"
                       % (LIVENESS_TIMEOUT,))
            return
        if self.online_at and now - self.online_at > STABLE_AFTER:
            self.backoff.reset()
    def connect(self) -> None:
        if self.stop_event.is_set():
            return
        self.webcams.refresh()
        self.drop_connection("reconnect")
        self.connect_at = 0.
        self.set_state(CONNECTING, self.last_error)
        self.challenge = ""
        self.hello_at = 0.
        if self.proxy_problem:
            self._schedule_retry(self.proxy_problem)
            return
        proxy = self.proxy
        try:
            link = links.Link.open(self.client_factory, self.inbox,
                                   self.options.server_url,
                                   self.options.ca_file or True, proxy)
        except Exception as e:
            self._schedule_retry(links.connect_error_text(
                e, self.options.server_url, proxy))
            return
        self.link = link
        if self.stop_event.is_set():
            self.drop_connection("stopped")
            return
        self.connected_at = time.monotonic()
        self.deadline = self.connected_at + WELCOME_TIMEOUT
        self.local_ip = links.local_ip(self.options.server_url, proxy)
        self.rlog("connected", "connected to %s%s", self.options.server_url,
                  " through proxy " + proxy.shown if proxy else "")
    def connect_later(self, delay: float) -> None:
        """Connect in delay seconds, from the supervisor's loop (the inbox
        keeps flowing meanwhile).  The state says connecting; the welcome
        deadline counts from the connection itself."""
        self.drop_connection("reconnect")
        self.challenge = ""
        self.hello_at = 0.
        self.set_state(CONNECTING, "")
        self.connect_at = time.monotonic() + delay
    def wait_reply(self, state: str, timeout: float, error: str = "") -> None:
        """Enter a state that waits for the cloud's answer."""
        self.set_state(state, error)
        self.deadline = time.monotonic() + timeout
    def drop_connection(self, why: str) -> None:
        link, self.link = self.link, None
        if link is not None:
            link.close()
        self.online_at = 0.
        # Closing aborts the socket at once, so a report still in
        # python-engineio's send queue (or unacknowledged) goes out again
        self.jobs.link_lost()
    def _fail(self, why: str) -> None:
        """A connection attempt or live session ended; retry later."""
        was_online = self.state == ONLINE
        self.drop_connection(why)
        if self.auth.pending_register is not None:
            self.auth.finish_register(False, "registration failed: %s"
                                      % (why,))
            return
        if was_online:
            self.console("Polar Cloud: connection lost (%s); reconnecting"
                         % (why,), log=False)
        self._schedule_retry(why)
    def _schedule_retry(self, why: str) -> None:
        if self.auth.pending_register is not None:
            # Only a SERVER_ERROR reply is tried again (auth.retry_register)
            self.auth.finish_register(False, why)
            return
        if self.identity is None:
            self.set_state(UNREGISTERED, why)
            return
        delay = self.backoff.next_delay()
        self.retry_at = time.monotonic() + delay
        self.set_state(BACKOFF, why)
        self.outage.retry(why, delay)
    def authenticated(self) -> None:
        """The cloud accepted the hello."""
        self.online_at = time.monotonic()
        self.set_state(ONLINE, "")
        serial = self.identity.serial
        self.outage.over(serial)
        self.console("Polar Cloud: online as %s" % (serial,), log=False)
        self.reporter.online(self.online_at)
        self.emit("capabilities", {"serialNumber": serial})
        if self.commands.command_list():
            self.emit("customCommandList", {
                "serialNumber": serial,
                "commandList": self.commands.command_list()})
        self.jobs.flush()
        self.timelapse.hello_done()
    # Link news
    def _link_news(self, name: str, data: Any) -> None:
        handler = self._news.get(name)
        if handler is not None:
            handler(data)
    def _disconnected(self, data: Any) -> None:
        if self.link is not None and not self.link.connected:
            self._fail("disconnected by Polar Cloud")
    def _undecodable(self, data: Any) -> None:
        self.rlog("undecodable", "dropped a message from the cloud that"
                  " cannot be decoded (%s)", data, level=logging.WARNING)
    def _oversized(self, data: tuple[int, str]) -> None:
        size, head = data
        event = links.OVERSIZED_EVENT_RE.match(head)
        name = event.group(1) if event else "?"
        self.rlog("oversized", "dropped a %d-byte '%s' message from the"
                  " cloud (the limit is %d bytes)", size, name,
                  links.MAX_INBOUND_BYTES, level=logging.WARNING)
        job = links.OVERSIZED_JOB_RE.search(head)
        if name == "print" and job and self.state == ONLINE:
            # Still answer the job, so it does not hang in the cloud
            self.jobs.refuse_unread(job.group(1) or job.group(2),
                                    "the print message is too large")
    def on_welcome(self, data: Any) -> None:
        if self.state != CONNECTING or self.link is None:
            return
        self.challenge = inbound.parse_welcome(data)
        if self.auth.pending_register is not None:
            self.auth.send_register()
        elif self.identity is not None:
            if self.camera.probing():
                # Let the hello say whether there is a camera
                self.hello_at = time.monotonic() + HELLO_CAMERA_WAIT
            else:
                self.auth.send_hello(self.challenge)
        else:
            self.drop_connection("unregistered")
            self.set_state(UNREGISTERED, "")
    def on_capabilities(self, data: Any) -> None:
        if isinstance(data, dict) and isinstance(data.get("capabilities"),
                                                 list):
            self.capabilities = [c for c in data["capabilities"][:32]
                                 if isinstance(c, str)]
            self.lab.capabilities(self.capabilities)
