"""Fixtures shared by the test files, one of each.  Helpers (register,
wait_polar, provision, EMAIL, PIN...) live in tests/testbed/helpers.py.

    sim               a local Polar Cloud with one account (EMAIL, PIN);
                      a test module may set SIM_OPTIONS (PolarSim keywords)
    make_klippy       a real klippy of either flavour (testbed/fixtures.py)
    polar_klippy      a started klippy with [polar_cloud] pointing at sim
    registered_klippy the same, registered from its console, online
    online_klippy     a klippy whose printer is provisioned and online,
                      with k.hist (every printer.polar_cloud update)
    proxy             the fault proxy between the printer and sim
    camera_server     a loopback webcam
"""
from __future__ import annotations

import pytest

from tests.testbed.camera_server import CameraServer
from tests.testbed.faultproxy import FaultProxy
from tests.testbed.fixtures import make_klippy  # noqa: F401
from tests.testbed.helpers import (
    EMAIL,
    EXTRA,
    PIN,
    StateHistory,
    polar_cfg,
    register,
    start_provisioned,
)
from tests.testbed.klippy import Klippy
from tests.testbed.polarsim import PolarSim


@pytest.fixture(scope="module")
def sim(request):
    s = PolarSim(**getattr(request.module, "SIM_OPTIONS", {})).start()
    s.add_account(EMAIL, PIN)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def polar_klippy(make_klippy, sim):  # noqa: F811
    """Factory: a started klippy with [polar_cloud] pointing at the sim."""
    def factory(flavour: str = "klipper", extra_cfg: str = "", env=None,
                workdir=None, **options) -> Klippy:
        k = make_klippy(flavour, extra_cfg=polar_cfg(sim.url, **options)
                        + extra_cfg, env=env, extras={"polar_cloud": EXTRA},
                        workdir=workdir)
        k.state_path = k.workdir / "polar_cloud"
        return k
    return factory


@pytest.fixture(scope="module")
def registered_klippy(polar_klippy, sim):
    """Factory: polar_klippy(...), registered through POLAR_REGISTER;
    k.serial set."""
    def factory(flavour: str = "klipper", **kw) -> Klippy:
        k = polar_klippy(flavour, **kw)
        k.serial = register(k, sim)
        return k
    return factory


@pytest.fixture(scope="module")
def online_klippy(make_klippy, sim):  # noqa: F811
    """Factory: start_provisioned(...) (server_url may point at a proxy),
    online; k.serial, k.state_path and k.hist set."""
    def factory(**kw) -> Klippy:
        k = start_provisioned(make_klippy, sim, **kw)
        k.hist = StateHistory.attach(k)
        k.hist.wait_for(lambda st: st["state"] == "online", since=0)
        return k
    return factory


@pytest.fixture(scope="module")
def proxy(sim):
    p = FaultProxy(("127.0.0.1", sim.port)).start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def camera_server():
    server = CameraServer().start()
    yield server
    server.stop()
