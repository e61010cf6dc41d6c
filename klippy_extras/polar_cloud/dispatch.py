# Which code handles which cloud event.  Collaborators register the events
# they own; nothing else the cloud sends is ever called.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import logging
from typing import Any, Callable

from . import protocol
from .ratelog import RateLimitedLog

log = logging.getLogger("polar_cloud")

# Cloud events this printer knows but does not act on
UNSUPPORTED_EVENTS = frozenset({"sendNextPrintResponse", "getQueueResponse",
                                "keyPair"})

Handler = Callable[[Any], None]


class Dispatcher:
    def __init__(self, rlog: RateLimitedLog, verbose: bool = False):
        self.rlog = rlog
        self.verbose = verbose
        self.handlers: dict[str, tuple[Handler, bool]] = {}
    def on(self, event: str, handler: Handler, online: bool = True) -> None:
        """Handle a cloud event; online: only once authenticated."""
        self.handlers[event] = (handler, online)
    def forget(self, event: str) -> None:
        self.handlers.pop(event, None)
    def dispatch(self, name: str, data: Any, online: bool) -> None:
        """One cloud event; a bad one is dropped and logged once."""
        entry = self.handlers.get(name)
        if entry is None and name not in UNSUPPORTED_EVENTS:
            self.rlog("unknown", "ignoring unknown event from the cloud:"
                      " %.32r", name, level=logging.WARNING)
            return
        if self.verbose:
            log.info("polar_cloud: received %s", name)
        if (entry is None or entry[1]) and not online:
            self.rlog("early:" + name, "ignoring '%s' before the printer is"
                      " authenticated", name)
            return
        if entry is None:
            self.rlog("ignored:" + name, "ignoring '%s' from the cloud (not"
                      " supported)", name)
            return
        try:
            entry[0](data)
        except protocol.ProtocolError as e:
            self.rlog("bad:" + name, "dropped malformed '%s': %s", name, e,
                      level=logging.WARNING)
        except Exception:
            # A message we could not handle says nothing about the link:
            # drop the message, keep the session
            self.rlog("failed:" + name, "could not handle '%s' from the"
                      " cloud; dropped", name, level=logging.WARNING,
                      exc_info=True)
