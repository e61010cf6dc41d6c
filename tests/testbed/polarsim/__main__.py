"""CLI: ``python -m tests.testbed.polarsim --port 8765``.

Prints the URL, then one line per event and violation.  Control API on the
same port (JSON bodies):

  POST /_sim/push    {"event": "print", "data": {...}, "serial": "KL000001"}
  GET  /_sim/events  ?since=<seq>&name=<event>
  POST /_sim/fault   {"name": "refuse_connections", "value": "503"}
  POST /_sim/files   {"name": "job.gcode", "content": "G28\\n", "mode": "ok"}
  POST /_sim/drop    {"serial": null, "how": "reset"}
  POST /_sim/account {"email": "...", "pin": "..."}
  GET  /_sim/state
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from typing import Any

from .records import SimEvent
from .server import DEFAULT_EMAIL, DEFAULT_PIN, PolarSim, describe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.testbed.polarsim",
        description="Local Polar Cloud simulator",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--ping-interval", type=int, default=25)
    parser.add_argument("--ping-timeout", type=int, default=20)
    parser.add_argument("--url-expires", type=int, default=600)
    parser.add_argument("--max-size", type=int, default=1_000_000)
    parser.add_argument(
        "--account",
        action="append",
        default=[],
        metavar="EMAIL:PIN",
        help=f"extra account (default {DEFAULT_EMAIL}:{DEFAULT_PIN} always exists)",
    )
    parser.add_argument("--quiet", action="store_true", help="no per-event lines")
    args = parser.parse_args(argv)

    t0 = time.monotonic()

    def on_event(ev: SimEvent) -> None:
        if not args.quiet:
            print(f"{ev.t - t0:9.3f} {describe(ev)}", flush=True)

    def on_violation(text: str) -> None:
        print(f"{time.monotonic() - t0:9.3f} !! VIOLATION {text}", flush=True)

    sim = PolarSim(
        args.host,
        args.port,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        url_expires=args.url_expires,
        max_size=args.max_size,
        on_event=on_event,
        on_violation=on_violation,
    )
    for account in args.account:
        email, _, pin = account.partition(":")
        sim.add_account(email, pin)
    sim.start()
    print(f"polarsim listening on {sim.url}", flush=True)
    print(
        f"  control API: {sim.url}/_sim/{{push,events,fault,files,drop,account,state}}",
        flush=True,
    )

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stop.wait(1.0):
        pass
    sim.stop()
    print(f"polarsim stopped; {len(sim.violations)} violation(s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
