"""Registering a printer from klippy's console, and what a registered
printer then does: status through a local print, the heartbeat, restarts,
a shutdown, a rejected key, unregistering.  One real klippy (upstream
Klipper) against the local Polar Cloud; the cases run in order."""
from __future__ import annotations

import base64
import os
import stat

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from tests.testbed.helpers import (
    EMAIL,
    PIN,
    polar_status,
    print_local,
    register,
    wait_objects,
    wait_polar,
)
from tests.testbed.klippy import KlippyError


@pytest.fixture(scope="module")
def k(polar_klippy):
    return polar_klippy("klipper")


def console(k, script, pattern, timeout=60.):
    out = k.subscribe_output()
    try:
        k.gcode(script)
        return out.wait_for(pattern, timeout=timeout)
    finally:
        out.close()


def test_starts_unregistered_and_says_how_to_register(k, sim):
    st = polar_status(k)
    assert st["state"] == "unregistered" and not st["registered"]
    assert st["connected"] is False and st["serial_number"] == ""
    # Unregistered printers keep no connection open
    assert sim.connected() == 0
    line = console(k, "POLAR_STATUS", r"not registered")
    assert "POLAR_REGISTER" in line


@pytest.mark.parametrize("script,error", [
    ("POLAR_REGISTER PIN=1234", "EMAIL is required"),
    ("POLAR_REGISTER EMAIL=someone PIN=1234", "does not look like an e-mail"),
    ("POLAR_REGISTER EMAIL=a@b.org", "PIN is required"),
    ('POLAR_REGISTER EMAIL=a@b.org PIN="12 34"', "letters and digits"),
])
def test_register_rejects_bad_input(k, script, error):
    with pytest.raises(KlippyError, match=error):
        k.gcode(script)
    assert polar_status(k)["state"] == "unregistered"


@pytest.mark.parametrize("reply,expected", [
    ({"status": "FAILED", "reason": "FORBIDDEN"},
     "already registered to another account"),
    ({"status": "FAILED", "reason": "MFG_UNKNOWN"},
     "does not know this manufacturer"),
    ({"status": "FAILED", "reason": "MFG_MISSING"}, "manufacturer code"),
    ({"status": "FAILED", "reason": "INVALID_KEY"}, "public key"),
    # SERVER_ERROR is tried again: tests/test_reregistration.py
    ("SUCCESS", "sent no serial number"),
    ({"status": "SUCCESS", "reason": "SUCCESS"}, "sent no serial number"),
])
def test_registration_failure_reasons(k, sim, reply, expected):
    sim.set_fault("register_reply", reply)
    line = console(k, "POLAR_REGISTER EMAIL=%s PIN=%s" % (EMAIL, PIN),
                   r"registration failed: .*", timeout=60)
    assert expected in line
    st = wait_polar(k, lambda s: s["state"] == "unregistered")
    assert not st["registered"] and expected in st["last_error"]
    # The registration connection is closed; nothing is retried by itself
    sim.wait_until(lambda: sim.connected() == 0, timeout=10)


def test_wrong_pin_is_reported_in_plain_words(k, sim):
    line = console(k, "POLAR_REGISTER EMAIL=%s PIN=0000" % (EMAIL,),
                   r"registration failed: .*")
    assert "e-mail and PIN were not accepted" in line
    assert sim.sent("registerResponse")[-1] == {
        "status": "FAILED", "reason": "EMAIL_PIN_ERROR"}


def test_register_returns_before_the_cloud_answers(k, sim):
    """The command returns at once: the cloud has not even replied yet."""
    sim.set_fault("no_register_response", True)
    try:
        out = k.subscribe_output()
        k.gcode("POLAR_REGISTER EMAIL=%s PIN=%s" % (EMAIL, PIN))
        out.wait_for(r"registering as m\*\*\*@school.example.org")
        # The key is made (or checked) by a child first: wait, don't read
        wait_polar(k, lambda s: s["state"] == "registering")
        # ...and the console gets the outcome later (the reply deadline)
        line = out.wait_for(r"registration failed: .*", timeout=90)
        out.close()
        assert "no reply to the registration" in line
    finally:
        sim.set_fault("no_register_response", False)


def test_register_happy_path(k, sim):
    registers_before = len(sim.received("register"))
    serial = register(k, sim)
    st = polar_status(k)
    assert st["registered"] and st["connected"] and st["serial_number"] \
        == serial
    assert len(sim.received("register")) == registers_before + 1
    reg = sim.received("register")[-1]
    assert reg["mfg"] == "kl" and reg["email"] == EMAIL
    assert reg["publicKey"].startswith("-----BEGIN PUBLIC KEY-----")
    # The hello came on a fresh connection and its signature is real
    hello = sim.received("hello", serial=serial)[-1]
    assert hello["protocol"] == "2" and hello["printerMake"] == "Cartesian"
    assert hello["mfgSn"] == "KL-" + hello["MAC"].replace(":", "")
    assert hello["camOff"] == 1 and hello["transformImg"] == 0
    key = serialization.load_pem_public_key(reg["publicKey"].encode())
    challenge = [e for e in sim.sent("welcome")][-1]["challenge"]
    key.verify(base64.b64decode(hello["signature"]), challenge.encode(),
               padding.PKCS1v15(), hashes.SHA256())
    assert sim.live_sessions(serial) == 1
    version = sim.wait_for("setVersion", serial=serial)
    assert version["runningVersion"]
    # Identity on disk: key 0600 in a 0700 folder beside config/
    state = k.state_path
    assert state == k.config_dir.parent / "polar_cloud"
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state / "key.pem").st_mode) == 0o600
    assert sim.violations == []
    k.serial = serial


def test_status_reports_through_a_local_print(k, sim):
    serial = k.serial
    since = print_local(k, sim, "local.gcode", moves=400, feedrate=3000)
    printing = sim.wait_for("status", lambda d: d["status"] == 1,
                            since=since, serial=serial, timeout=60)
    assert printing["jobId"] == "123" and printing["fileSize"] > 0
    assert printing["startTime"].endswith("Z")
    k.query("print_stats")
    # Heating happens inside the print: targets reach the cloud
    sim.wait_for("status", lambda d: d["targetBed"] == 50.0
                 and d["targetTool0"] == 200.0, since=since, timeout=60)
    wait_objects(k, {"print_stats": ["print_duration"]},
                 lambda s: s["print_stats"]["print_duration"] > 0)
    t = sim.now()
    k.gcode("PAUSE")
    paused = sim.wait_for("status", lambda d: d["status"] == 4, since=t,
                          timeout=30)
    assert paused["jobId"] == "123" and paused["progressDetail"].startswith(
        "Paused")
    assert paused["bytesRead"] > 0 and paused["printSeconds"] >= 0
    t = sim.now()
    k.gcode("RESUME")
    sim.wait_for("status", lambda d: d["status"] == 1, since=t, timeout=30)
    done = sim.wait_for("status", lambda d: d["status"] == 0, since=t,
                        timeout=120)
    assert done["jobId"] == "0"
    assert k.query("print_stats")["print_stats"]["state"] == "complete"
    # A local print ends without a cloud job report
    assert sim.received("job", serial=serial) == []
    assert sim.violations == []


def test_idle_status_heartbeat_and_temperatures(k, sim):
    status = sim.wait_for("status", serial=k.serial, since=sim.now() - 1.,
                          timeout=90)
    for key in ("tool0", "targetTool0", "bed", "targetBed"):
        assert isinstance(status[key], float)
    assert status["status"] == 0 and isinstance(status["estimatedTime"], int)


def test_heater_target_change_is_reported_promptly(k, sim):
    t = sim.now()
    k.gcode("M140 S45")
    status = sim.wait_for("status", lambda d: d["targetBed"] == 45.0,
                          since=t, timeout=30)
    assert status["status"] == 0
    k.gcode("M140 S0")


def test_restart_leaves_exactly_one_session(k, sim):
    serial = k.serial
    for _ in range(5):
        hellos = sim.connects(serial)
        k.restart()
        sim.wait_until(lambda h=hellos: sim.connects(serial) > h, timeout=60)
        sim.wait_until(lambda: sim.live_sessions(serial) == 1, timeout=30)
    k.restart(firmware=True)
    wait_polar(k, lambda s: s["state"] == "online")
    sim.wait_until(lambda: sim.live_sessions(serial) == 1, timeout=30)
    assert sim.connected() == 1
    assert polar_status(k)["serial_number"] == serial
    assert sim.violations == []


def test_shutdown_is_reported_as_error(k, sim):
    t = sim.now()
    k.mcu.shutdown("Timer too close")
    k.wait_state("shutdown")
    err = sim.wait_for("status", lambda d: d["status"] == 12, since=t,
                       serial=k.serial, timeout=30)
    assert err["progressDetail"]
    # POLAR_STATUS still answers while klippy is shut down
    console(k, "POLAR_STATUS", r"Polar Cloud: online")
    t = sim.now()
    k.restart(firmware=True)
    sim.wait_for("status", lambda d: d["status"] == 0, since=t,
                 serial=k.serial, timeout=60)


def test_rejected_key_stops_retrying(k, sim):
    """A hello the cloud refuses puts the printer in auth_failed."""
    serial = k.serial
    sim.set_fault("hello_reply", {"status": "FAILED",
                                  "message": "bad signature"})
    try:
        attempts = len(sim.connection_attempts())
        sim.drop(serial)
        st = wait_polar(k, lambda s: s["state"] == "auth_failed")
        assert "bad signature" in st["last_error"]
        # A moment later still nothing more was tried
        st = console(k, "POLAR_STATUS", r"last error: .*")
        assert len(sim.connection_attempts()) == attempts + 1
    finally:
        sim.set_fault("hello_reply", None)


def test_unregister_then_register_again(k, sim):
    # Come back online first (a RESTART re-reads the identity)
    k.restart()
    wait_polar(k, lambda s: s["state"] == "online")
    serial = k.serial
    line = console(k, "POLAR_UNREGISTER", r"printer \w+ unregistered")
    assert serial in line
    assert sim.received("unregister")[-1] == {"serialNumber": serial}
    st = wait_polar(k, lambda s: s["state"] == "unregistered")
    assert not st["registered"] and st["serial_number"] == ""
    assert not (k.state_path / "key.pem").exists()
    assert sim.live_sessions(serial) == 0
    k.serial = register(k, sim)


def test_no_secrets_anywhere(k, sim):
    signatures = [h["signature"] for h in sim.received("hello")]
    texts = {"klippy.log": k.log_text()}
    for root, _dirs, files in os.walk(k.workdir):
        for name in files:
            path = os.path.join(root, name)
            if name == "key.pem" or not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                texts[path] = f.read().decode("utf-8", "replace")
    texts["get_status"] = repr(polar_status(k))
    for where, text in texts.items():
        assert PIN not in text, where
        assert "PRIVATE KEY" not in text, where
        for sig in signatures:
            assert sig[:40] not in text, where
