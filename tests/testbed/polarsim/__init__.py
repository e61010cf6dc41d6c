"""Local Polar Cloud simulator for the polar_cloud tests and demo.

A strict python-socketio server (Engine.IO v4 / Socket.IO v5, ``/socket.io/``,
websocket + polling) plus an HTTP side (job files, S3-style uploads, control
API) on one 127.0.0.1 port.  What it checks: docs/protocol.md; how the tests
use it: docs/testing.md.

In-process (own thread and asyncio loop; every method is sync and
thread-safe)::

    from tests.testbed.polarsim import PolarSim
    with PolarSim(ping_interval=2, ping_timeout=2) as sim:
        url = sim.add_file("job.gcode", b"G28\\n")
        ...                                  # point the printer at sim.url
        sim.wait_for("status", lambda d: d["status"] == 0, timeout=10)
        sim.push_print("KL000001", "job-1", gcode_url=url)
        assert sim.violations == []

Faults (attributes, or ``set_fault(name, value)``; ``clear_faults()``):
``no_welcome``, ``welcome_payload``, ``refuse_connections`` (True/"503",
"sio", "reset", "closed"), ``black_hole`` (True/"socket", "http"),
``no_hello_response``, ``hello_reply``, ``no_register_response``,
``register_reply`` (queued, one per reply), ``no_geturl_response``,
``geturl_reply`` (queued), ``upload_fail``; plus ``drop()``/``drop_all()``
(reset, close, disconnect) and ``freeze()`` (half-open link: no pings, no
data, TCP stays open).  Settings: ``url_expires``, ``max_size``,
``timelapse_max_size`` (maxSize of ``timelapse`` slots),
``capabilities``, ``hello_required``.

Timelapse uploads (``getUrl`` type ``timelapse``) must be
``timelapse.mp4``, ``video/mp4``, and an H.264 MP4 that ``ffprobe``
reads; the upload record carries what it found under ``"video"``.

CLI (demo)::

    python -m tests.testbed.polarsim --port 8765
"""

from .checks import HELLO_REQUIRED, MFG_CODES
from .httpside import FILE_MODES, UploadForm
from .records import SimEvent
from .server import (
    BLACK_HOLE_MODES,
    DEFAULT_EMAIL,
    DEFAULT_PIN,
    FAULT_NAMES,
    REFUSE_MODES,
    SETTING_NAMES,
    PolarSim,
    Printer,
    Session,
    describe,
    load_public_key,
)

__all__ = [
    "BLACK_HOLE_MODES",
    "DEFAULT_EMAIL",
    "DEFAULT_PIN",
    "FAULT_NAMES",
    "FILE_MODES",
    "HELLO_REQUIRED",
    "MFG_CODES",
    "REFUSE_MODES",
    "SETTING_NAMES",
    "PolarSim",
    "Printer",
    "Session",
    "SimEvent",
    "UploadForm",
    "describe",
    "load_public_key",
]
