# The cloud session's states, as POLAR_STATUS and printer.polar_cloud show
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

DISABLED = "disabled"
UNREGISTERED = "unregistered"
CONNECTING = "connecting"
REGISTERING = "registering"
AUTHENTICATING = "authenticating"
ONLINE = "online"
BACKOFF = "backoff"
AUTH_FAILED = "auth_failed"
STOPPED = "stopped"

# States with a reply deadline, and what missing it means
WAITING = {CONNECTING: "no welcome from Polar Cloud",
           REGISTERING: "no reply to the registration",
           AUTHENTICATING: "no reply to hello"}
