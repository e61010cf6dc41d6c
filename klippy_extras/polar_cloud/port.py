# What the session's collaborators (jobs, commands, snapshots, reporting,
# auth) may ask of it.  They are given the session typed as CloudPort and
# use nothing else; everything here runs on the session thread unless it
# says otherwise.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import threading
from typing import Any, Callable, Optional, Protocol

from .gcode_queue import GcodeQueue
from .ratelog import RateLimitedLog

Reply = Callable[[bool, str], None]


class CloudPort(Protocol):
    options: Any                    # options.Options
    version: str
    stop_event: threading.Event     # set when klippy disconnects
    abandoned: bool                 # True: never write state files again
    rlog: RateLimitedLog
    gcode: GcodeQueue               # read-only: what is waiting for klippy
    lab: Any                        # lab.LabWorkflow: the build plate gate
    bridge: Any                     # extra.ReactorBridge; run_gcode_now()
    #                                 only from a run_gcode reply
    def on(self, event: str, handler: Callable[[Any], None],
           online: bool = True) -> None:
        """Handle a cloud event (online: only once authenticated)."""
    def post(self, fn: Callable, *args) -> None:
        """Run fn(*args) on the session thread; any thread may call."""
    def snapshot(self) -> Optional[dict]:
        """The latest sample of the printer (printer_state.py)."""
    def serial(self) -> Optional[str]: ...
    def is_online(self) -> bool: ...
    def emit(self, event: str, data: dict, callback=None) -> bool:
        """Send to the cloud; False if not sent (offline, slow link)."""
    def last_rx(self) -> float:
        """When the cloud last sent anything (monotonic)."""
    def run_gcode(self, key: str, script: str, reply: Reply) -> None:
        """Run on the reactor, one cloud script at a time; reply(ok,
        error) runs on the reactor."""
    def report_failure(self, what: str) -> Reply:
        """A reply that tells the console when the script failed."""
    def console(self, text: str, error: bool = False,
                log: bool = True) -> None: ...
    def status_now(self) -> None:
        """Send a status at the next chance."""
    def publish(self) -> None:
        """Refresh what get_status shows (after a status went out)."""
    def loopback_test_server(self) -> bool:
        """Plain-http loopback URLs are allowed (a local test cloud)."""
