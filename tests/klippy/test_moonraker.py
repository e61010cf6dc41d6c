"""The extra as Moonraker and its clients see it.

A real Moonraker (PyPI, .venv-moonraker built by scripts/moonraker_env.sh)
in front of a real klippy on the simulated MCU, with the printer talking to
the strict local Polar Cloud: the webhooks endpoints re-exported over HTTP
and JSON-RPC, live `polar_cloud` status for a websocket subscriber, and
Moonraker's file API never serving the printer's identity.
"""
from __future__ import annotations

import os
import shutil
import urllib.parse

import pytest

from tests.testbed.fixtures import ARTIFACTS
from tests.testbed.helpers import EMAIL, PIN
from tests.testbed.moonraker import Moonraker, MoonrakerError

STATES = {"unregistered", "connecting", "registering", "authenticating",
          "online", "backoff", "auth_failed", "disabled"}


@pytest.fixture(scope="module")
def k(polar_klippy):
    return polar_klippy("klipper")


@pytest.fixture(scope="module")
def mr(k, request):
    failed_before = request.session.testsfailed
    m = Moonraker(k).start()
    yield m
    m.stop()
    if request.session.testsfailed > failed_before and m.log_path.exists():
        dest = ARTIFACTS / "test_moonraker" / k.workdir.name
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(m.log_path, dest / m.log_path.name)


def state_path_of(states: list[dict]) -> list[str]:
    """polar_cloud.state values in the order a subscriber saw them, with
    repeats (other fields changing) folded."""
    seen: list[str] = []
    for st in states:
        state = st.get("polar_cloud", {}).get("state")
        if state and (not seen or seen[-1] != state):
            seen.append(state)
    return seen


def test_status_over_http(k, mr, sim):
    st = mr.get("/printer/polar_cloud/status")
    assert st["state"] == "unregistered" and st["registered"] is False
    assert st["serial_number"] == "" and st["connected"] is False
    assert st["server"] == sim.url
    assert any("POLAR_REGISTER" in line for line in st["lines"])
    # The same fields as printer.polar_cloud, for UIs that query objects
    obj = mr.get("/printer/objects/query?polar_cloud")["status"]["polar_cloud"]
    assert {key: st[key] for key in obj} == obj
    assert set(st) - set(obj) == {"lines", "token"}
    assert "polar_cloud" in mr.get("/printer/objects/list")["objects"]


@pytest.mark.parametrize("params,error", [
    ({"email": "someone", "pin": "1234"}, "does not look like an e-mail"),
    ({"email": EMAIL}, "pin"),
    ({"email": EMAIL, "pin": "12 34"}, "letters and digits"),
])
def test_register_rejects_bad_input_with_a_400(mr, sim, params, error):
    with pytest.raises(MoonrakerError) as exc:
        mr.post("/printer/polar_cloud/register", **params)
    assert exc.value.code == 400 and error in exc.value.message
    assert mr.get("/printer/polar_cloud/status")["state"] == "unregistered"
    assert sim.received("register") == [] and sim.connected() == 0


def token(mr) -> str:
    return mr.get("/printer/polar_cloud/status")["token"]


def test_register_needs_the_status_token(mr, sim):
    # A page on another origin can make a LAN browser send a GET or a
    # form POST, but cannot read the status to learn the token
    # (not the account's PIN: Moonraker logs a GET's query string)
    for params in ({}, {"token": "0" * 32}):
        with pytest.raises(MoonrakerError, match="token"):
            mr.get("/printer/polar_cloud/register?" + urllib.parse.urlencode(
                dict(email=EMAIL, pin="Other1", **params)))
        with pytest.raises(MoonrakerError, match="token"):
            mr.post("/printer/polar_cloud/register", email=EMAIL,
                    pin="Other1", **params)
        with pytest.raises(MoonrakerError, match="token"):
            mr.post("/printer/polar_cloud/unregister", force=True, **params)
    assert mr.get("/printer/polar_cloud/status")["state"] == "unregistered"
    assert sim.received("register") == [] and sim.connected() == 0
    # The token is not among the printer object's fields
    obj = mr.get("/printer/objects/query?polar_cloud")["status"]["polar_cloud"]
    assert "token" not in obj


def test_register_over_http_watched_over_the_websocket(k, mr, sim):
    ws = mr.websocket()
    first = ws.subscribe({"polar_cloud": None})
    assert first["polar_cloud"]["state"] == "unregistered"
    since = sim.now()
    reply = mr.post("/printer/polar_cloud/register", email=EMAIL, pin=PIN,
                    token=token(mr))
    assert reply == {"state": "registering"}
    final = ws.wait_status(
        lambda st: st["polar_cloud"]["state"] == "online", timeout=90)
    pc = final["polar_cloud"]
    serial = pc["serial_number"]
    assert serial and pc["connected"] is True and pc["registered"] is True
    # What the simulator saw: one registration from this e-mail, then a
    # live authenticated session under the serial the UI shows.
    regs = sim.received("register", since=since)
    assert len(regs) == 1 and regs[0]["email"] == EMAIL
    assert sim.printer(serial) is not None and sim.live_sessions(serial) == 1
    # Notifications: unregistered first, online last, nothing but the
    # registration path in between.
    path = state_path_of(ws.history)
    assert path[0] == "unregistered" and path[-1] == "online", path
    assert set(path) <= {"unregistered", "registering", "connecting",
                         "authenticating", "online"}, path
    # The console lines reach the websocket as Mainsail/Fluidd show them
    said = [n["params"][0] for n in ws.notifications
            if n.get("method") == "notify_gcode_response"]
    assert any("serial number %s" % (serial,) in line for line in said), said
    # JSON-RPC: the webhooks endpoint as a websocket method
    st = ws.call("printer.polar_cloud.status")
    assert st["state"] == "online" and st["serial_number"] == serial
    assert "serial number: %s" % (serial,) in st["lines"]
    # A second registration is refused while registered
    with pytest.raises(MoonrakerError, match="already registered"):
        ws.call("printer.polar_cloud.register", {"email": EMAIL, "pin": PIN,
                                                 "token": token(mr)})
    k.serial = serial


def test_reconnect_reaches_a_subscriber(k, mr, sim):
    serial = k.serial
    ws = mr.websocket()
    first = ws.subscribe({"polar_cloud": ["state", "connected", "last_error"]})
    assert first["polar_cloud"]["state"] == "online"
    hellos = sim.connects(serial)
    sim.drop(serial, "reset")
    lost = ws.wait_status(lambda st: st["polar_cloud"]["state"] == "backoff")
    assert lost["polar_cloud"]["connected"] is False
    assert lost["polar_cloud"]["last_error"]
    ws.wait_status(lambda st: st["polar_cloud"]["state"] == "online", timeout=60)
    assert sim.connects(serial) == hellos + 1
    assert sim.live_sessions(serial) == 1
    path = state_path_of(ws.history)
    assert path[0] == "online" and path[-1] == "online", path
    assert path[1] == "backoff" and set(path) <= {
        "online", "backoff", "connecting", "authenticating"}, path


def test_file_api_does_not_serve_the_identity(k, mr):
    state = k.state_path
    assert state.parent == k.config_dir.parent       # beside config/
    secrets = {p.name: p.read_bytes() for p in state.iterdir()}
    assert "key.pem" in secrets
    key_body = [line for line in secrets["key.pem"].splitlines()
                if line and not line.startswith(b"-----")]
    # Listings of every root Moonraker serves
    roots = [r["name"] for r in mr.get("/server/files/roots")]
    assert set(roots) >= {"config", "gcodes", "logs"}
    for root in roots:
        listing = mr.get("/server/files/list?root=%s" % (root,))
        names = {os.path.basename(f["path"]) for f in listing}
        assert not names & set(secrets), (root, names)
        tree = mr.request("GET", "/server/files/get_directory?path=%s"
                          "&extended=true" % (root,))[1]
        assert b"polar_cloud" not in tree and b"key.pem" not in tree
    # Direct downloads, also through the roots' parent
    for path in ("config/../polar_cloud/key.pem",
                 "config/..%2Fpolar_cloud%2Fkey.pem",
                 "config/%2e%2e/polar_cloud/key.pem",
                 "logs/../polar_cloud/identity.json",
                 "gcodes/../polar_cloud/key.pem",
                 "polar_cloud/key.pem",
                 "config/polar_cloud/key.pem",
                 "config/key.pem"):
        status, body = mr.request("GET", "/server/files/" + path)
        assert status in (400, 403, 404), (path, status)
        assert not any(chunk in body for chunk in key_body), path
    # The console history Moonraker keeps for every UI
    store = mr.get("/server/gcode_store?count=1000")["gcode_store"]
    text = "\n".join(item["message"] for item in store)
    assert "serial number %s" % (k.serial,) in text
    assert PIN not in text and "PRIVATE KEY" not in text
    assert not any(chunk.decode() in text for chunk in key_body)
    # Nor anything Moonraker logged or stored
    for root, _dirs, files in os.walk(k.workdir):
        if os.path.abspath(root).startswith(str(state)):
            continue
        for name in files:
            path = os.path.join(root, name)
            if not os.path.isfile(path):        # sockets, the MCU's pty
                continue
            with open(path, "rb") as f:
                data = f.read()
            assert PIN.encode() not in data, name
            assert not any(chunk in data for chunk in key_body), name


def test_unregister_over_json_rpc(k, mr, sim):
    serial = k.serial
    ws = mr.websocket()
    ws.subscribe({"polar_cloud": None})
    assert ws.call("printer.polar_cloud.unregister", {
        "token": token(mr)}) == {"state": "unregistering"}
    st = ws.wait_status(lambda s: s["polar_cloud"]["state"] == "unregistered")
    assert st["polar_cloud"]["serial_number"] == ""
    assert sim.received("unregister")[-1] == {"serialNumber": serial}
    assert sim.live_sessions(serial) == 0
    assert not (k.state_path / "key.pem").exists()
    assert mr.get("/printer/polar_cloud/status")["registered"] is False
