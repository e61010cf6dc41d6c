# One session per state folder across RESTART
#
# RESTART keeps klippy's process, and this module with it: a new session
# finds the one it replaces here, waits for it to write its last state,
# and one still busy after that never writes again (abandoned).
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import logging
import threading
from typing import Any

# How long a new session waits for the one it replaces to write its last
# state, on its own thread
TAKEOVER_WAIT = 5.

log = logging.getLogger("polar_cloud")

# The session (a session.CloudSession) that last owned each state folder
_owners: dict[str, Any] = {}
_owners_lock = threading.Lock()


def take_over(session) -> None:
    """Make session the owner of its state folder, once the previous
    owner has written its last state (session thread)."""
    path = session.options.state_path
    with _owners_lock:
        previous = _owners.get(path)
        _owners[path] = session
    thread = previous.thread if previous is not None else None
    if thread is not None and thread.is_alive():
        thread.join(TAKEOVER_WAIT)
        if thread.is_alive():
            previous.abandoned = True
            log.info("polar_cloud: the old session thread is still"
                     " busy; it will end by itself")
