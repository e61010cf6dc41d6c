"""Several printers on one host: two klippy instances with the KIAUH
layout (<home>/printer_data, <home>/printer_data_2), each with its own
printer.cfg and state folder, are two Polar Cloud printers: their own MAC,
their own serial, both online at once, the same serials after RESTART and
after a new klippy process."""
from __future__ import annotations

import json
import uuid

import pytest

from tests.testbed.helpers import polar_status, register, wait_polar

# The simulator (tests/testbed/polarsim) recognises a printer by its MAC as
# the cloud does: two instances sending one MAC would be one printer, the
# second registration taking the first one's (test_polarsim's
# test_two_printers_sending_one_mac_are_one_printer).


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    return tmp_path_factory.mktemp("host-")


@pytest.fixture(scope="module")
def pair(polar_klippy, host):
    first = polar_klippy("klipper", workdir=host / "printer_data")
    second = polar_klippy("klipper", workdir=host / "printer_data_2")
    return first, second


def recorded_mac(k) -> str:
    return json.loads((k.state_path / "identity.json").read_text())["mac"]


def both_online(sim, pair):
    sim.wait_until(lambda: all(sim.live_sessions(k.serial) == 1 for k in pair),
                   timeout=60, what="one live session for each instance")
    for k in pair:
        st = polar_status(k)
        assert st["state"] == "online" and st["serial_number"] == k.serial


def test_two_instances_register_as_two_printers(pair, sim):
    first, second = pair
    regs = []
    for k in pair:
        since = sim.now()
        k.serial = register(k, sim)
        regs.append(sim.received("register", since=since)[-1])
    assert first.serial != second.serial
    macs = [r["myInfo"]["MAC"] for r in regs]
    assert macs[0] != macs[1]
    assert [r["mfgSn"] for r in regs] == ["KL-" + m.replace(":", "")
                                          for m in macs]
    assert [recorded_mac(k) for k in pair] == macs
    # printer_data is the host's default instance: it keeps the host's MAC
    node = uuid.getnode()
    if not node & (1 << 40):    # else: no readable MAC here, random ones
        assert macs[0] == ":".join("%02X" % b for b in node.to_bytes(6, "big"))
    first_octet = int(macs[1][:2], 16)
    assert first_octet & 0x02 and not first_octet & 0x01   # local unicast
    both_online(sim, pair)
    for k, mac in zip(pair, macs):
        assert sim.printer(k.serial).mac == mac
        assert sim.received("hello", serial=k.serial)[-1]["MAC"] == mac
    assert sim.violations == []


def test_both_back_after_restart_with_the_same_serials(pair, sim):
    macs = [recorded_mac(k) for k in pair]
    for k in pair:
        since = sim.now()
        k.restart()
        wait_polar(k, lambda st: st.get("state") == "online")
        hello = sim.wait_for("hello", serial=k.serial, since=since, timeout=60)
        assert hello["MAC"] == recorded_mac(k)
    both_online(sim, pair)
    # A new klippy process (a reboot, an upgrade of the module)
    second = pair[1]
    since = sim.now()
    second.stop()
    second.start()
    wait_polar(second, lambda st: st.get("state") == "online")
    assert sim.wait_for("hello", serial=second.serial, since=since,
                        timeout=60)["MAC"] == macs[1]
    both_online(sim, pair)
    assert [recorded_mac(k) for k in pair] == macs
    assert len(sim.received("register")) == 2
    assert sim.violations == []
