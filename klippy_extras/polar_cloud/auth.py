# Who the printer is to Polar Cloud: registration, unregistration and the
# signed hello.  Runs on the session thread.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import logging
import time
from typing import Any, Optional

from . import handoff, inbound, messages, protocol
from .camera_hints import camera_hints
from .identity import IdentityError, IdentityStore
from .ratelog import duration_text
from .states import (
    AUTH_FAILED,
    AUTHENTICATING,
    BACKOFF,
    DISABLED,
    ONLINE,
    REGISTERING,
    UNREGISTERED,
)

REPLY_TIMEOUT = 30.
# A registerResponse SERVER_ERROR is tried again with backoff, this many
# attempts in all and not for longer than this
REGISTER_ATTEMPTS = 5
REGISTER_RETRY_FOR = 10 * 60.
# Between the registration and the hello's connection, like both
# reference clients (docs/protocol.md, section 2.3)
HELLO_AFTER_REGISTER = 2.
# A rejected hello rarely clears by itself: retry after a long pause
AUTH_RETRY_DELAY = 30 * 60.
PIN_NOTE = ("Polar Cloud: note: the PIN went through Klipper: typed in the"
            " console it stays in the console history, and klippy.log may"
            " show it if Klipper shuts down soon. Next time register from"
            " the printer's shell with polar_cloud/scripts/register.sh"
            " --email <e-mail>, which asks for the PIN (see the README).")
DELETED_TEXT = ("was deleted in Polar Cloud; register it again with"
                " POLAR_REGISTER")

log = logging.getLogger("polar_cloud")


class Auth:
    def __init__(self, session, store: IdentityStore):
        self.session = session
        self.store = store
        self.options = session.options
        # (e-mail, PIN) while a registration runs, SERVER_ERROR retries
        # included; in memory only, dropped when it ends either way
        self.pending_register: Optional[tuple[str, str]] = None
        self.register_attempts = 0
        self.register_started = 0.
        self.pending_unregister = False
        self.unregister_deadline = 0.
        # The id of a registration requested by scripts/register.sh
        self.handoff_id: Optional[str] = None
        self.handoff_checked = 0.
        session.on("registerResponse", self.on_register_response,
                   online=False)
        session.on("helloResponse", self.on_hello_response, online=False)
        session.on("unregisterResponse", self.on_unregister_response)
        session.on("delete", self.on_delete)
    # Registration
    def start_register(self, email: str, pin: str) -> None:
        session = self.session
        if session.state == DISABLED:
            return
        self.pending_register = (email, pin)
        self.register_attempts = 0
        self.register_started = time.monotonic()
        session.identity = None
        session.backoff.reset()
        session.console("Polar Cloud: preparing the printer key...",
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
            session.snapshots.probe()
        except IdentityError as e:
            self.finish_register(False, str(e))
            return
        session.connect()
        if session.link is None and self.pending_register is not None:
            self.finish_register(False, session.last_error)
    def send_register(self) -> None:
        email, pin = self.pending_register
        machine = self.store.machine()
        msg = messages.build_register(
            self.options.manufacturer, email, pin, self.store.public_pem(),
            machine["mfg_sn"], machine["mac"],
            self.options.machine_type, self.options.printer_make)
        self.register_attempts += 1
        self.session.wait_reply(REGISTERING, REPLY_TIMEOUT)
        # The PIN stays in pending_register until the registration ends:
        # a SERVER_ERROR reply sends it again
        self.session.emit("register", msg)
    def on_register_response(self, data: Any) -> None:
        session = self.session
        if session.state != REGISTERING:
            return
        result = inbound.parse_register_response(data)
        if not result.ok:
            if result.reason in ("NO_SERIAL", "MALFORMED"):
                log.warning("polar_cloud: unexpected registerResponse shape"
                            " (%s)", sorted(data) if isinstance(data, dict)
                            else type(data).__name__)
            if result.reason in inbound.RETRYABLE_REGISTER_REASONS:
                self.retry_register(result)
            else:
                self.finish_register(False, result.message)
            return
        try:
            session.identity = self.store.save(result.serial,
                                               self.options.server_url)
        except (IdentityError, OSError) as e:
            self.finish_register(False, "cannot save the identity: %s" % e)
            return
        self.finish_register(True, result.serial)
        session.backoff.reset()
        # The protocol wants a fresh connection for the hello; both
        # reference clients leave the cloud a moment first
        session.connect_later(HELLO_AFTER_REGISTER)
    def retry_register(self, result: inbound.RegisterResult) -> None:
        """The cloud could not add the printer this time (SERVER_ERROR):
        register again after a backoff delay, a few times at most."""
        session = self.session
        now = time.monotonic()
        delay = session.backoff.next_delay()
        if self.register_attempts >= REGISTER_ATTEMPTS \
                or now + delay - self.register_started > REGISTER_RETRY_FOR:
            self.finish_register(False, "%s (%s, %d attempts in %s)" % (
                result.message, result.reason, self.register_attempts,
                duration_text(now - self.register_started)))
            return
        session.drop_connection("registration retry")
        session.retry_at = now + delay
        session.set_state(BACKOFF, "Polar Cloud could not add the printer"
                          " (%s); retrying" % (result.reason,))
        session.console("Polar Cloud could not add the printer (%s);"
                        " retrying in %.0f s (attempt %d of %d)"
                        % (result.reason, delay, self.register_attempts + 1,
                           REGISTER_ATTEMPTS))
    def finish_register(self, ok: bool, detail: str) -> None:
        session = self.session
        self.pending_register = None
        # register.sh gets its answer last, when the state is final
        handoff_id, self.handoff_id = self.handoff_id, None
        if ok:
            session.last_error = ""
            session.console("Polar Cloud: registered, serial number %s;"
                            " connecting" % (detail,))
            log.info("polar_cloud: registered as %s", detail)
            if handoff_id is not None:
                self.answer_handoff(handoff_id, True, detail)
            else:
                session.console(PIN_NOTE, log=False)
            return
        session.drop_connection("registration failed")
        session.identity = None
        session.set_state(UNREGISTERED, detail)
        session.console("Polar Cloud registration failed: %s" % (detail,),
                        error=True)
        log.warning("polar_cloud: registration failed: %s", detail)
        if handoff_id is not None:
            self.answer_handoff(handoff_id, False, detail)
    # Registration handed over by scripts/register.sh (see handoff.py)
    def poll_handoff(self, now: float) -> None:
        session = self.session
        # A session being replaced (RESTART) leaves requests to the next
        if session.stop_event.is_set() or now - self.handoff_checked < 1.:
            return
        first = not self.handoff_checked
        self.handoff_checked = now
        state_dir = self.options.state_path
        try:
            if first and handoff.sweep(state_dir):
                log.info("polar_cloud: removed leftovers of an interrupted"
                         " register.sh")
            req = handoff.take_request(state_dir)
        except handoff.HandoffError as e:
            log.warning("polar_cloud: register.sh request refused: %s", e)
            if e.request_id:
                self.answer_handoff(e.request_id, False, str(e))
            return
        except OSError as e:
            session.rlog("handoff", "cannot read the register.sh request: %s",
                         e.strerror, level=logging.WARNING)
            return
        if req is None:
            return
        email, pin, req.pin = req.email, req.pin, ""
        refusal = (protocol.validate_email(email)
                   or protocol.validate_pin(pin))
        if session.state == DISABLED:
            refusal = session.last_error or "the cloud session is disabled"
        elif session.identity is not None and session.state != AUTH_FAILED:
            self.answer_handoff(req.request_id, False, "already registered"
                                " as %s" % (session.identity.serial,),
                                already=True)
            return
        elif self.pending_register is not None or \
                session.state == REGISTERING:
            refusal = "a registration is already in progress"
        if refusal:
            self.answer_handoff(req.request_id, False, refusal)
            return
        self.handoff_id = req.request_id
        session.console("Polar Cloud: registering as %s (requested from the"
                        " shell)" % (protocol.redact_email(email),), log=False)
        try:
            self.start_register(email, pin)
        except Exception:
            # The supervisor logs it and carries on; the script is told
            if self.handoff_id == req.request_id:
                self.answer_handoff(req.request_id, False, "internal error;"
                                    " see klippy.log")
            raise
    def answer_handoff(self, request_id: str, ok: bool, detail: str,
                       already: bool = False) -> None:
        self.handoff_id = None
        identity = self.session.identity
        serial = detail if ok else (
            identity.serial if already and identity else "")
        try:
            handoff.write_result(self.options.state_path, request_id, ok,
                                 serial=serial, reason="" if ok else detail,
                                 already=already)
        except OSError as e:
            log.warning("polar_cloud: cannot answer register.sh: %s",
                        e.strerror)
    # Unregistration
    def start_unregister(self, force: bool) -> None:
        session = self.session
        if session.identity is None:
            session.console("Polar Cloud: this printer is not registered")
            return
        if session.state != ONLINE:
            if not force:
                session.console(
                    "Polar Cloud is not reachable, so the printer stays"
                    " registered. POLAR_UNREGISTER FORCE=1 forgets it on this"
                    " printer only (then delete it on polar3d.com).",
                    error=True)
                return
            self.forget("unregistered on this printer only")
            return
        self.pending_unregister = True
        session.emit("unregister", {"serialNumber": session.identity.serial})
        self.unregister_deadline = time.monotonic() + REPLY_TIMEOUT
    def on_unregister_response(self, data: Any) -> None:
        if not self.pending_unregister:
            return
        self.pending_unregister = False
        ok, message = inbound.parse_status_reply(data, "unregisterResponse")
        if not ok:
            self.session.console("Polar Cloud refused to unregister: %s"
                                 % (message or "no reason given"), error=True)
            return
        self.forget("unregistered")
    def check_unregister(self, now: float) -> None:
        if self.pending_unregister and now >= self.unregister_deadline:
            self.pending_unregister = False
            self.session.console("Polar Cloud did not answer the unregister"
                                 " request; the printer stays registered",
                                 error=True)
    def forget(self, why: str) -> None:
        session = self.session
        serial = session.identity.serial if session.identity else "?"
        try:
            self.store.wipe()
        except (IdentityError, OSError) as e:
            log.warning("polar_cloud: cannot wipe identity: %s", e)
        session.identity = None
        session.camera.forget_urls()
        session.timelapse.forget()
        session.drop_connection(why)
        # After the link is gone: nothing it held goes back to the outbox
        session.jobs.forget_identity()
        session.set_state(UNREGISTERED, "")
        session.console("Polar Cloud: printer %s %s" % (serial, why))
        log.info("polar_cloud: printer %s %s", serial, why)
    def on_delete(self, data: Any) -> None:
        if isinstance(data, dict):
            inbound.check_serial(data, self.session.serial(), "delete")
        self._deleted()
    def _deleted(self) -> None:
        self.forget(DELETED_TEXT)
        self.session.last_error = "printer deleted in Polar Cloud"
        self.session.publish()
    # Authentication
    def send_hello(self, challenge: str) -> None:
        session = self.session
        ident = session.identity
        msg = messages.build_hello(
            ident.serial, self.store.sign(challenge), ident.mac,
            ident.mfg_sn, self.options.printer_make, session.version,
            session.local_ip, camera_hints(
                session.camera.opts, session.local_ip,
                session.camera.available() is True))
        session.wait_reply(AUTHENTICATING, REPLY_TIMEOUT, session.last_error)
        session.emit("hello", msg)
    def on_hello_response(self, data: Any) -> None:
        session = self.session
        if session.state != AUTHENTICATING:
            return
        status, message = inbound.parse_hello_response(data)
        if status == "SUCCESS":
            session.authenticated()
            return
        if status == "DELETED":
            self._deleted()
            return
        session.drop_connection("hello rejected")
        session.retry_at = time.monotonic() + AUTH_RETRY_DELAY
        session.set_state(AUTH_FAILED, "Polar Cloud rejected the printer: %s"
                          % (message,))
        session.console("Polar Cloud rejected the printer: %s" % (message,),
                        error=True)
