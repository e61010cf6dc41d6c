"""Shared fixtures: a local Polar Cloud and real klippy processes with the
polar_cloud extra linked in."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.testbed.fixtures import make_klippy  # noqa: F401
from tests.testbed.klippy import Klippy
from tests.testbed.polarsim import PolarSim

REPO = Path(__file__).resolve().parent.parent
EXTRA = REPO / "klippy_extras" / "polar_cloud"
EMAIL = "maker@school.example.org"
PIN = "Zq7x91"          # distinctive, so a leak is findable by grep


@pytest.fixture(scope="module")
def sim():
    s = PolarSim().start()
    s.add_account(EMAIL, PIN)
    yield s
    s.stop()


def polar_section(sim: PolarSim, **options) -> str:
    options.setdefault("webcam_enabled", "False")
    lines = ["[polar_cloud]", "server_url: %s" % (sim.url,)]
    lines += ["%s: %s" % (k, v) for k, v in options.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def polar_klippy(make_klippy, sim):  # noqa: F811
    """Factory: a started klippy with [polar_cloud] pointing at the sim."""
    def factory(flavour: str = "klipper", extra_cfg: str = "", env=None,
                workdir=None, **options) -> Klippy:
        k = make_klippy(flavour, extra_cfg=polar_section(sim, **options)
                        + extra_cfg, env=env, extras={"polar_cloud": EXTRA},
                        workdir=workdir)
        k.state_path = k.workdir / "polar_cloud"
        return k
    return factory


def polar_status(k: Klippy) -> dict:
    return k.query("polar_cloud")["polar_cloud"]


def wait_polar(k: Klippy, predicate, timeout: float = 60.) -> dict:
    sub = k.subscribe_objects({"polar_cloud": None})
    try:
        return sub.wait_for(lambda st: predicate(st.get("polar_cloud", {})),
                            timeout=timeout)["polar_cloud"]
    finally:
        sub.close()


def wait_objects(k: Klippy, objects: dict, predicate,
                 timeout: float = 60.) -> dict:
    """Wait until the subscribed printer objects satisfy predicate."""
    sub = k.subscribe_objects(objects)
    try:
        return sub.wait_for(predicate, timeout=timeout)
    finally:
        sub.close()


def register(k: Klippy, sim: PolarSim, email: str = EMAIL,
             pin: str = PIN) -> str:
    """Register through the console; return the serial once online."""
    out = k.subscribe_output()
    try:
        k.gcode("POLAR_REGISTER EMAIL=%s PIN=%s" % (email, pin))
        line = out.wait_for(r"registered, serial number (\w+)|registration"
                            r" failed", timeout=90)
    finally:
        out.close()
    match = re.search(r"serial number (\w+)", line)
    assert match, line
    serial = match.group(1)
    wait_polar(k, lambda st: st.get("state") == "online")
    return serial
