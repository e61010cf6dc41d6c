# The Klipper-facing side of polar_cloud: options, G-code commands,
# webhooks endpoints, get_status and the klippy lifecycle.
#
# Runs on the reactor.  All network, crypto and file work happens in the
# cloud session's thread; this side only reads printer objects, posts
# snapshots to the session and runs what the session asks for through the
# bridge.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import functools
import hmac
import importlib.util
import logging
import secrets
import threading
from typing import Callable

from . import lab, protocol
from .makes import PrinterMakes
from .netpolicy import hide_url_queries
from .options import read_options
from .pauses import PauseReasons
from .printer_state import PrinterSampler
from .session import CloudSession

VERSION = "0.1.0"
SAMPLE_INTERVAL = .25
REQUIRED_PACKAGES = {"socketio": "python-socketio", "engineio":
                     "python-engineio", "websocket": "websocket-client",
                     "requests": "requests", "cryptography": "cryptography"}


def guarded(handler):
    """A G-code or webhooks handler whose bugs can't shut the printer down:
    klippy turns any exception but a command error into a shutdown."""
    @functools.wraps(handler)
    def wrapper(self, request):
        try:
            return handler(self, request)
        except self.printer.command_error:
            raise
        except Exception:
            logging.exception("polar_cloud: %s failed", handler.__name__)
            raise self.printer.command_error(
                "polar_cloud: internal error (see klippy.log)") from None
    return wrapper


def missing_packages() -> list[str]:
    return [pip_name for module, pip_name in REQUIRED_PACKAGES.items()
            if importlib.util.find_spec(module) is None]


class ReactorBridge:
    """The only way the session thread reaches klippy.

    Every call becomes a reactor async callback; once klippy disconnects
    (RESTART) the bridge is dead and late calls from the old session are
    dropped.  No exception escapes into the reactor.
    """

    def __init__(self, printer):
        self.printer = printer
        self.reactor = printer.get_reactor()
        self.gcode = printer.lookup_object("gcode")
        self.alive = True
        # Made at config time, on the reactor's thread
        self.reactor_thread = threading.get_ident()
    def call(self, fn: Callable, *args) -> None:
        if not self.alive:
            return
        def callback(eventtime):
            if not self.alive:
                return
            try:
                fn(*args)
            except Exception:
                logging.exception("polar_cloud: reactor callback failed")
        self.reactor.register_async_callback(callback)
    def console(self, text: str, error: bool = False, log: bool = True) -> None:
        self.call(self._respond, text, error, log)
    def _respond(self, text: str, error: bool, log: bool) -> None:
        if error:
            self.gcode.respond_raw("!! " + text)
            if log:
                logging.info("polar_cloud: %s", text)
        else:
            self.gcode.respond_info(text, log=log)
    def run_gcode(self, script: str, reply: Callable[[bool, str], None]):
        """Run a script on the reactor; reply(ok, error) on the reactor."""
        def run():
            try:
                self.gcode.run_script(script)
            except self.printer.command_error as e:
                reply(False, str(e))
                return
            except Exception:
                # The caller waits for a reply, whatever went wrong
                logging.exception("polar_cloud: cloud G-code failed")
                reply(False, "internal error (see klippy.log)")
                return
            reply(True, "")
        self.call(run)
    def run_gcode_now(self, script: str) -> str:
        """Run a script at once from a run_gcode reply (on the reactor):
        before any other callback, behind at most a command that already
        waited for the G-code lock.  '' when it ran, else klippy's error."""
        if threading.get_ident() != self.reactor_thread:
            self.run_gcode(script, lambda ok, error: None)
            return "not on the reactor, queued"
        try:
            self.gcode.run_script(script)
        except self.printer.command_error as e:
            return str(e)
        return ""


class PolarCloud:
    def __init__(self, config):
        self.printer = config.get_printer()
        self.reactor = self.printer.get_reactor()
        self.gcode = self.printer.lookup_object("gcode")
        self.options = read_options(config)
        self.missing = missing_packages()
        self.bridge = ReactorBridge(self.printer)
        self.session = CloudSession(self.options, self.bridge, VERSION)
        self.pause_reasons = PauseReasons(self.printer,
                                          self.options.filament_change_macros)
        self.sampler = PrinterSampler(self.printer, self.pause_reasons.sample)
        self.makes = PrinterMakes(self.options, self.bridge)
        self.sample_timer = None
        self.started = False
        # Register and unregister over the API need the token that only a
        # read of polar_cloud/status gives: a web page on another origin
        # can make a browser send a request, but cannot read the answer
        self.request_token = secrets.token_hex(16)
        if self.options.verbose is False:
            for name in ("socketio", "engineio", "urllib3", "websocket"):
                logging.getLogger(name).setLevel(logging.WARNING)
        hide_url_queries()      # signed URLs, verbose or not
        # Lifecycle
        self.printer.register_event_handler("klippy:ready",
                                            self._handle_ready)
        self.printer.register_event_handler("klippy:shutdown",
                                            self._handle_shutdown)
        self.printer.register_event_handler("klippy:disconnect",
                                            self._handle_disconnect)
        # Commands
        self.gcode.register_command("POLAR_REGISTER", self.cmd_POLAR_REGISTER,
                                    desc=self.cmd_POLAR_REGISTER_help)
        self.gcode.register_command("POLAR_STATUS", self.cmd_POLAR_STATUS,
                                    when_not_ready=True,
                                    desc=self.cmd_POLAR_STATUS_help)
        self.gcode.register_command("POLAR_SNAPSHOT", self.cmd_POLAR_SNAPSHOT,
                                    desc=self.cmd_POLAR_SNAPSHOT_help)
        self.gcode.register_command("POLAR_UNREGISTER",
                                    self.cmd_POLAR_UNREGISTER,
                                    desc=self.cmd_POLAR_UNREGISTER_help)
        self.gcode.register_command("POLAR_PLATE_CLEARED",
                                    self.cmd_POLAR_PLATE_CLEARED,
                                    desc=self.cmd_POLAR_PLATE_CLEARED_help)
        self.gcode.register_command("POLAR_PRINTER_MAKES",
                                    self.cmd_POLAR_PRINTER_MAKES,
                                    desc=self.cmd_POLAR_PRINTER_MAKES_help)
        webhooks = self.printer.lookup_object("webhooks")
        webhooks.register_endpoint("polar_cloud/status",
                                   self._handle_status_request)
        webhooks.register_endpoint("polar_cloud/register",
                                   self._handle_register_request)
        webhooks.register_endpoint("polar_cloud/unregister",
                                   self._handle_unregister_request)
        webhooks.register_endpoint("polar_cloud/plate_cleared",
                                   self._handle_plate_cleared_request)
    # Lifecycle
    def _handle_ready(self) -> None:
        try:
            self.pause_reasons.wrap_macros()
            self.sampler.find_objects()
            self._post_sample(self.reactor.monotonic())
            if self.printer.get_start_args().get("debugoutput") is not None:
                return
            self.session.start(self.missing)
            self.started = True
            self.sample_timer = self.reactor.register_timer(
                self._sample_event, self.reactor.NOW)
            if "requests" not in self.missing:
                self.makes.check_at_start()
        except Exception:
            logging.exception("polar_cloud: cannot start")
    def _handle_shutdown(self) -> None:
        try:
            self._post_sample(self.reactor.monotonic())
        except Exception:
            logging.exception("polar_cloud: shutdown sample failed")
    def _handle_disconnect(self) -> None:
        self.bridge.alive = False
        if self.started:
            # The last word on a print that ended right before a RESTART:
            # the session records it before it stops
            try:
                self._post_sample(self.reactor.monotonic())
            except Exception:
                logging.exception("polar_cloud: final sample failed")
            self.session.stop()
    def _post_sample(self, eventtime: float) -> None:
        snap, changed = self.sampler.sample(eventtime)
        self.session.post_snapshot(snap, changed)
    def _sample_event(self, eventtime: float) -> float:
        try:
            self._post_sample(eventtime)
        except Exception:
            logging.exception("polar_cloud: sampling the printer failed")
            return eventtime + 10.
        return eventtime + SAMPLE_INTERVAL
    # Status
    def get_status(self, eventtime=None) -> dict:
        info = self.session.public
        if info["state"] == "backoff":
            return dict(info, retry_in=self.session.retry_in())
        return info
    def status_lines(self) -> list[str]:
        info = self.get_status()
        state = info["state"]
        shown = state
        if info.get("retries") and state in ("connecting", "authenticating",
                                             "backoff"):
            shown = "%s (retry %d)" % (state, info["retries"])
        lines = ["Polar Cloud: %s" % (shown,),
                 "server: %s" % (info["server"],)]
        if info.get("proxy"):
            # host and port only: the proxy's credentials are secrets
            lines.append("through proxy: http://%s" % (info["proxy"],))
        if info["registered"]:
            lines.append("serial number: %s" % (info["serial_number"],))
        else:
            lines.append("not registered (use POLAR_REGISTER EMAIL=... PIN=...)")
        if info["online_since"]:
            lines.append("online since: %s" % (info["online_since"],))
        if state == "backoff":
            lines.append("next attempt in about %d s" % (info["retry_in"],))
        if info["job_id"] not in (protocol.NO_JOB_ID, ""):
            lines.append("current job: %s" % (info["job_id"],))
        if info["last_error"]:
            lines.append("last error: %s" % (info["last_error"],))
        for key in ("camera", "timelapse"):
            if info.get(key):
                lines.append("%s: %s" % (key, info[key]))
        return lines + lab.status_lines(self.options, info)
    # G-code commands
    def _check_register(self, email: str, pin: str) -> str:
        error = protocol.validate_email(email) or protocol.validate_pin(pin)
        if error:
            return error
        if self.missing:
            return ("missing Python packages: %s (run install.sh)"
                    % (", ".join(self.missing),))
        info = self.session.public
        if info["registered"] and info["state"] != "auth_failed":
            return ("this printer is already registered as %s; run"
                    " POLAR_UNREGISTER first" % (info["serial_number"],))
        if info["state"] in ("registering",):
            return "a registration is already in progress"
        if not self.started:
            return "klippy is not ready"
        return ""
    cmd_POLAR_REGISTER_help = ("Register this printer with Polar Cloud:"
                               " POLAR_REGISTER EMAIL=<e-mail> PIN=<pin>")
    @guarded
    def cmd_POLAR_REGISTER(self, gcmd) -> None:
        email = gcmd.get("EMAIL", "").strip()
        pin = gcmd.get("PIN", "").strip()
        error = self._check_register(email, pin)
        if error:
            raise gcmd.error("POLAR_REGISTER: %s" % (error,))
        self.session.register(email, pin)
        gcmd.respond_info("Polar Cloud: registering as %s; the result will"
                          " follow in the console"
                          % (protocol.redact_email(email),), log=False)
    cmd_POLAR_STATUS_help = "Show the Polar Cloud connection state"
    @guarded
    def cmd_POLAR_STATUS(self, gcmd) -> None:
        gcmd.respond_info("\n".join(self.status_lines()), log=False)
    cmd_POLAR_UNREGISTER_help = ("Remove this printer from Polar Cloud and"
                                 " forget its identity")
    @guarded
    def cmd_POLAR_UNREGISTER(self, gcmd) -> None:
        force = gcmd.get_int("FORCE", 0, minval=0, maxval=1)
        if not self.started:
            raise gcmd.error("POLAR_UNREGISTER: klippy is not ready")
        self.session.unregister(bool(force))
        gcmd.respond_info("Polar Cloud: unregistering; the result will"
                          " follow in the console", log=False)
    cmd_POLAR_SNAPSHOT_help = ("Take a webcam snapshot now and upload it to"
                               " Polar Cloud; the result follows")
    @guarded
    def cmd_POLAR_SNAPSHOT(self, gcmd) -> None:
        if not self.started or self.missing:
            raise gcmd.error("POLAR_SNAPSHOT: the cloud session is not"
                             " running")
        self.session.request_snapshot()
        gcmd.respond_info("Polar Cloud: taking a snapshot", log=False)
    cmd_POLAR_PLATE_CLEARED_help = ("Confirm the build plate is clear, so"
                                    " the next print may start")
    @guarded
    def cmd_POLAR_PLATE_CLEARED(self, gcmd) -> None:
        # From the console, a macro, or a gcode_button: the answer follows
        if not self.started:
            raise gcmd.error("POLAR_PLATE_CLEARED: the cloud session is not"
                             " running")
        self.session.plate_cleared("G-code")
    cmd_POLAR_PRINTER_MAKES_help = ("List the printer makes Polar Cloud knows"
                                    " for this machine type: [FILTER=<text>]")
    @guarded
    def cmd_POLAR_PRINTER_MAKES(self, gcmd) -> None:
        text = gcmd.get("FILTER", "").strip()
        if "requests" in self.missing:
            raise gcmd.error("POLAR_PRINTER_MAKES: missing Python packages"
                             " (run install.sh)")
        def answer(makes: list, error: str) -> None:
            self.gcode.respond_info("\n".join(
                self.makes.lines(makes, error, text)), log=False)
        if not self.makes.lookup(answer):
            gcmd.respond_info("Polar Cloud: loading the printer makes...",
                              log=False)
    # Webhooks endpoints (Moonraker: /printer/polar_cloud/...)
    @guarded
    def _handle_status_request(self, web_request) -> None:
        web_request.send(dict(self.get_status(), lines=self.status_lines(),
                              token=self.request_token))
    def _check_token(self, web_request) -> None:
        token = web_request.get_str("token", "")
        if not hmac.compare_digest(token, self.request_token):
            raise self.printer.command_error(
                "missing or stale token: read polar_cloud/status and send"
                " its 'token' with this request")
        self.request_token = secrets.token_hex(16)
    @guarded
    def _handle_register_request(self, web_request) -> None:
        email = web_request.get_str("email").strip()
        pin = web_request.get_str("pin").strip()
        error = self._check_register(email, pin)
        if error:
            raise self.printer.command_error(error)
        self._check_token(web_request)
        self.session.register(email, pin)
        web_request.send({"state": "registering"})
    @guarded
    def _handle_unregister_request(self, web_request) -> None:
        force = web_request.get("force", False) in (True, 1, "1", "true")
        if not self.started:
            raise self.printer.command_error("klippy is not ready")
        self._check_token(web_request)
        self.session.unregister(force)
        web_request.send({"state": "unregistering"})
    @guarded
    def _handle_plate_cleared_request(self, web_request) -> None:
        if not self.started:
            raise self.printer.command_error("klippy is not ready")
        if not self.options.require_plate_clear:
            raise self.printer.command_error(
                "require_plate_clear is off in [polar_cloud]")
        self._check_token(web_request)
        self.session.plate_cleared("web page")
        web_request.send({"plate_clear": True})
