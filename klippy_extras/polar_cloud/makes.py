# The printer makes Polar Cloud knows for this printer's machine type:
# POLAR_PRINTER_MAKES, and a check of printer_make at start
#
# GET <web_url>/api/v1/printer_makes?filter=<machine type> answers
# {"printerMakes": [...]}.  It is fetched once per klippy on a short
# thread of its own and cached; the answer reaches klippy only through the
# reactor bridge.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import difflib
import json
import logging
import threading
from typing import Callable, Optional

from . import netpolicy, tlstrust
from .httpget import get_body

log = logging.getLogger("polar_cloud")

API_PATH = "/api/v1/printer_makes"
TIMEOUT = (10., 20.)            # connect, read
MAX_BYTES = 1 << 20
MAX_MAKES = 2000
MAX_NAME = 128
# Generic names that need no look-up (Polar's list always has them)
GENERIC = ("cartesian", "delta", "belt")


def parse_makes(data) -> list[str]:
    """The names in a {"printerMakes": [...]} answer; ValueError if none."""
    if not isinstance(data, dict) or not isinstance(
            data.get("printerMakes"), list):
        raise ValueError("not a printer make list")
    names = {name.strip() for name in data["printerMakes"][:MAX_MAKES]
             if isinstance(name, str) and 0 < len(name.strip()) <= MAX_NAME
             and name.isprintable()}
    return sorted(names)


def closest(name: str, makes: list[str], count: int = 3) -> list[str]:
    """The makes most like name, best first (case does not matter)."""
    lower = {m.lower(): m for m in makes}
    return [lower[m] for m in difflib.get_close_matches(
        name.lower(), list(lower), count, 0.5)]


def matching(makes: list[str], text: str) -> list[str]:
    text = text.strip().lower()
    return [m for m in makes if text in m.lower()]


def fetch(url: str, machine_type: str, ca_file: str = "") -> list[str]:
    """On a helper thread: the list, or an exception.  Through the proxy
    netpolicy names, trusting ca_file besides the usual CAs."""
    with tlstrust.requests_session(netpolicy.proxy_for(url),
                                    ca_file) as http:
        body = get_body(http, url, TIMEOUT, MAX_BYTES, "the answer",
                        params={"filter": machine_type.lower()},
                        headers={"Accept": "application/json"})
    return parse_makes(json.loads(body.decode("utf-8")))


class PrinterMakes:
    """The cached list; look-ups answer on the reactor."""

    def __init__(self, options, bridge):
        self.url = options.web_url + API_PATH
        self.machine_type = options.machine_type
        self.printer_make = options.printer_make
        self.ca_file = options.ca_file
        self.bridge = bridge
        self.lock = threading.Lock()
        self.makes: Optional[list[str]] = None
        self.waiting: list[Callable] = []
        self.busy = False
    def lookup(self, answer: Callable[[list, str], None]) -> bool:
        """answer(makes, error) on the reactor; True if it was answered at
        once from the cache."""
        with self.lock:
            makes = self.makes
            if makes is None:
                self.waiting.append(answer)
                if not self.busy:
                    self.busy = True
                    threading.Thread(target=self._run, daemon=True,
                                     name="polar_cloud-makes").start()
                return False
        answer(makes, "")
        return True
    def _run(self) -> None:
        makes, error = [], ""
        try:
            makes = fetch(self.url, self.machine_type, self.ca_file)
        except Exception as e:
            error = "cannot load Polar Cloud's printer makes (%s: %.80s)" % (
                e.__class__.__name__, e)
            log.info("polar_cloud: %s", error)
        with self.lock:
            if not error:
                self.makes = makes
            waiting, self.waiting = self.waiting, []
            self.busy = False
        for answer in waiting:
            self.bridge.call(answer, makes, error)
    # At start (reactor)
    def check_at_start(self) -> None:
        if self.printer_make.lower() not in GENERIC:
            self.lookup(self._check)
    def _check(self, makes: list, error: str) -> None:
        if error or not makes or self.printer_make in makes:
            return
        near = closest(self.printer_make, makes)
        text = ("Polar Cloud: printer_make '%s' is not one of Polar Cloud's"
                " %s printer makes; closest: %s (see POLAR_PRINTER_MAKES)"
                % (self.printer_make, self.machine_type,
                   ", ".join(near) or "none"))
        log.warning("polar_cloud: %s", text)
        self.bridge.console(text, log=False)
    def lines(self, makes: list, error: str, text: str) -> list[str]:
        """POLAR_PRINTER_MAKES output."""
        if error:
            return ["Polar Cloud: %s" % (error,)]
        shown = matching(makes, text) if text else makes
        head = "Polar Cloud: %d %s printer makes%s" % (
            len(shown), self.machine_type,
            " matching '%s'" % (text,) if text else "")
        return [head] + ["- %s%s" % (m, " (printer_make)"
                                     if m == self.printer_make else "")
                         for m in shown]
