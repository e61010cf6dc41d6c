"""The product end to end on any machine.

A simulated printer (the test bed's MCU), a local Polar Cloud (polarsim), a
loopback webcam, and the polar_cloud extra inside a real klippy.  The demo
registers the printer from the console, shows the status messages arriving
at the cloud, then prints a job sent from the cloud with a pause and a
resume, and ends with the cloud's record of the job.

    scripts/demo.sh            # run it (about a minute)
    scripts/demo.sh --keep     # leave everything running until Ctrl-C
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.testbed.camera_server import CameraServer  # noqa: E402
from tests.testbed.gcode_files import demo_print  # noqa: E402
from tests.testbed.klippy import Klippy, OutputTail, link_extra  # noqa: E402
from tests.testbed.polarsim import PolarSim  # noqa: E402
from tests.testbed.polarsim.server import describe  # noqa: E402

EMAIL, PIN = "demo@school.example.org", "2468"
T0 = time.monotonic()
print_lock = threading.Lock()


def say(who: str, text: str) -> None:
    with print_lock:
        print("%7.2f  %-7s %s" % (time.monotonic() - T0, who, text),
              flush=True)


class EchoTail(OutputTail):
    """Console lines as they arrive, printed like Mainsail's console."""

    def _apply(self, msg: dict) -> None:
        super()._apply(msg)
        resp = msg.get("params", {}).get("response")
        if isinstance(resp, str):
            for line in resp.split("\n"):
                say("console", line)


def cloud_event(ev) -> None:
    if ev.name in ("status", "job", "register", "hello", "registerResponse",
                   "helloResponse", "print", "pause", "resume", "getUrl",
                   "authenticated", "connect", "disconnect"):
        say("cloud", describe(ev))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flavour", default="klipper",
                        choices=("klipper", "kalico"))
    parser.add_argument("--keep", action="store_true",
                        help="keep running until Ctrl-C")
    args = parser.parse_args()

    sim = PolarSim(on_event=cloud_event,
                   on_violation=lambda t: say("cloud", "!! VIOLATION " + t))
    sim.add_account(EMAIL, PIN)
    sim.start()
    camera = CameraServer().start()
    camera.live = True
    say("demo", "local Polar Cloud at %s, webcam at %s" % (sim.url,
                                                          camera.url))
    link_extra(args.flavour, REPO / "klippy_extras" / "polar_cloud",
               "polar_cloud")
    workdir = Path(tempfile.mkdtemp(prefix="polar-demo-"))
    k = Klippy(workdir, args.flavour, extra_cfg="\n".join([
        "[polar_cloud]", "server_url: %s" % (sim.url,),
        "snapshot_url: %s" % (camera.snapshot_url,),
        "stream_url: %s" % (camera.stream_url,),
        "snapshot_interval_printing: 5", ""]))
    try:
        say("demo", "starting klippy (%s) in %s" % (args.flavour, workdir))
        k.start()
        out = EchoTail(str(k.api_path))
        say("demo", "POLAR_REGISTER EMAIL=%s PIN=****" % (EMAIL,))
        k.gcode("POLAR_REGISTER EMAIL=%s PIN=%s" % (EMAIL, PIN))
        line = out.wait_for(r"registered, serial number (\w+)", timeout=90)
        serial = line.split()[-2].rstrip(";")
        sim.wait_for("status", serial=serial, timeout=60)
        url = sim.add_file("demo-cube.gcode", demo_print(
            moves=400, hotend=200, bed=50, feedrate=3000).encode())
        say("demo", "the cloud sends a print job")
        since = sim.now()
        sim.push_print(serial, "demo-1", job_name="Demo cube",
                       gcode_url=url)
        sim.wait_for("status", lambda d: d["status"] == 3, since=since,
                     serial=serial, timeout=120)
        say("demo", "the cloud pauses the print")
        sim.pause(serial)
        sim.wait_for("status", lambda d: d["status"] == 4, since=since,
                     serial=serial, timeout=30)
        say("demo", "the cloud resumes it")
        sim.resume(serial)
        job = sim.wait_for("job", lambda d: d["jobId"] == "demo-1",
                           since=since, serial=serial, timeout=300)
        say("demo", "the cloud recorded job demo-1: %s, %d s, %d mm of"
            " filament" % (job["state"], job["printSeconds"],
                           job["filamentUsed"]))
        uploads = len(sim.uploads)
        say("demo", "%d webcam snapshots uploaded; %d protocol violations"
            % (uploads, len(sim.violations)))
        k.gcode("POLAR_STATUS")
        out.wait_for(r"online since")
        if args.keep:
            say("demo", "running; Ctrl-C to stop (klippy API socket: %s)"
                % (k.api_path,))
            threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        k.stop()
        camera.stop()
        sim.stop()
        say("demo", "stopped; klippy.log is in %s" % (k.logs_dir,))


if __name__ == "__main__":
    main()
