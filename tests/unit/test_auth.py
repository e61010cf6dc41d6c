"""Who the printer is to Polar Cloud (auth.py), through a session with a
fake link and a fake key store: registering, the signed hello, the
cloud's refusals, unregistering, a printer deleted in the cloud."""
from __future__ import annotations

import time

import pytest

from klippy_extras.polar_cloud import auth, states
from tests.unit.fakes import (
    SERIAL,
    deliver,
    emitted,
    go_unregistered,
    make_session,
)

EMAIL, PIN = "maker@school.example.org", "Zq7x91"


@pytest.fixture
def s(tmp_path):
    return make_session(tmp_path)


@pytest.fixture
def new(s):
    """A printer that is not registered yet."""
    go_unregistered(s)
    return s


def register(s, reply=None):
    """POLAR_REGISTER, the cloud's welcome and its registerResponse."""
    s.register(EMAIL, PIN)
    s.step(0.)
    deliver(s, "welcome", {"challenge": "c1"})
    if reply is not None:
        deliver(s, "registerResponse", reply)


def test_registration_then_a_hello_on_a_fresh_connection(new):
    new.register(EMAIL, PIN)
    new.step(0.)
    assert new.state == states.CONNECTING and len(new.sios) == 1
    deliver(new, "welcome", {"challenge": "c1"})
    assert new.state == states.REGISTERING
    [msg] = emitted(new, "register")
    assert (msg["email"], msg["pin"], msg["mfg"]) == (EMAIL, PIN, "kl")
    assert msg["myInfo"]["MAC"] == "02:00:00:00:00:01"
    deliver(new, "registerResponse", {"status": "SUCCESS",
                                      "serialNumber": "KL000077"})
    assert new.auth.pending_register is None        # the PIN is gone
    assert new.store.saved == [("KL000077", "http://127.0.0.1:1")]
    assert ("Polar Cloud: registered, serial number KL000077; connecting"
            in new.bridge.console_lines)
    # typed in the console: a note says where the PIN stays, and no PIN
    assert "console history" in new.bridge.console_lines[-1]
    assert not any(PIN in line for line in new.bridge.console_lines)
    # the protocol wants the hello on a new connection, a little later
    # (as the reference clients do)
    assert len(new.sios) == 1 and not new.sios[0].connected
    assert new.state == states.CONNECTING
    new.connect_at = time.monotonic()
    new.step(0.)
    assert len(new.sios) == 2
    deliver(new, "welcome", {"challenge": "c2"})
    [hello] = emitted(new, "hello")
    assert hello["serialNumber"] == "KL000077"
    assert hello["signature"] == "c2lnbmF0dXJl"
    assert new.state == states.AUTHENTICATING
    deliver(new, "helloResponse", {"status": "SUCCESS"})
    assert new.state == states.ONLINE
    assert emitted(new, "capabilities") == [{"serialNumber": "KL000077"}]


def test_a_missing_key_is_made_an_unusable_one_replaced(new):
    new.store.key = None
    register(new)
    assert new.store.keys_made == 1


@pytest.mark.parametrize("reply,words", [
    ({"status": "FAILED", "reason": "EMAIL_PIN_ERROR"},
     "e-mail and PIN were not accepted"),
    ({"status": "FAILED", "reason": "FORBIDDEN"},
     "already registered to another account"),
    ({"status": "SUCCESS"}, "sent no serial number"),
])
def test_a_refused_registration_waits_for_the_user(new, reply, words):
    register(new, reply)
    assert new.state == states.UNREGISTERED and words in new.last_error
    assert new.link is None and new.identity is None
    assert new.bridge.console_lines[-1].startswith(
        "Polar Cloud registration failed: ")
    new.step(0.)
    assert len(new.sios) == 1                    # nothing tried by itself


def test_a_registration_without_an_answer_ends_at_the_deadline(new):
    register(new)
    new.deadline = time.monotonic() - 1.
    new.step(0.)
    assert new.state == states.UNREGISTERED
    assert new.last_error == ("registration failed: no reply to the"
                              " registration")


def test_no_registration_while_disabled(new):
    new.state = states.DISABLED
    new.register(EMAIL, PIN)
    new.step(0.)
    assert new.sios == [] and new.auth.pending_register is None


def test_a_rejected_hello_waits_half_an_hour(s):
    s.state = states.AUTHENTICATING
    deliver(s, "helloResponse", {"status": "FAILED",
                                 "message": "bad signature"})
    assert s.state == states.AUTH_FAILED and s.link is None
    assert s.last_error == "Polar Cloud rejected the printer: bad signature"
    assert s.retry_at - time.monotonic() > auth.AUTH_RETRY_DELAY - 5.
    s.step(0.)
    assert s.state == states.AUTH_FAILED and s.sios == []


def test_a_hello_answered_deleted_forgets_the_printer(s):
    s.state = states.AUTHENTICATING
    deliver(s, "helloResponse", {"status": "DELETED"})
    assert s.state == states.UNREGISTERED and s.identity is None
    assert s.store.wiped == 1
    assert s.public["last_error"] == "printer deleted in Polar Cloud"
    assert s.bridge.console_lines[-1] == (
        "Polar Cloud: printer %s %s" % (SERIAL, auth.DELETED_TEXT))


def test_a_delete_for_another_printer_is_refused(s):
    deliver(s, "delete", {"serialNumber": "KL999999"})
    assert s.state == states.ONLINE and s.store.wiped == 0


def test_replies_out_of_turn_are_ignored(s):
    deliver(s, "registerResponse", {"status": "SUCCESS",
                                    "serialNumber": "KL1"})
    deliver(s, "helloResponse", {"status": "DELETED"})
    deliver(s, "unregisterResponse", {"status": "SUCCESS"})
    assert s.state == states.ONLINE and s.store.wiped == 0


def test_unregister_online(s):
    s.unregister(False)
    s.step(0.)
    assert emitted(s, "unregister") == [{"serialNumber": SERIAL}]
    deliver(s, "unregisterResponse", {"status": "SUCCESS"})
    assert s.state == states.UNREGISTERED and s.store.wiped == 1
    assert s.bridge.console_lines[-1] == (
        "Polar Cloud: printer %s unregistered" % (SERIAL,))


def test_an_unregister_the_cloud_refuses_keeps_the_printer(s):
    s.unregister(False)
    s.step(0.)
    deliver(s, "unregisterResponse", {"status": "FAILED",
                                      "message": "busy"})
    assert s.state == states.ONLINE and s.store.wiped == 0
    assert s.bridge.console_lines[-1] == (
        "Polar Cloud refused to unregister: busy")


def test_an_unanswered_unregister_keeps_the_printer(s):
    s.unregister(False)
    s.step(0.)
    s.auth.unregister_deadline = time.monotonic() - 1.
    s.step(0.)
    assert s.identity is not None and not s.auth.pending_unregister
    assert "did not answer the unregister request" in \
        s.bridge.console_lines[-1]


def test_offline_only_force_forgets_the_printer(s):
    s.drop_connection("test")
    s.state = states.BACKOFF
    s.unregister(False)
    s.step(0.)
    assert s.identity is not None and "FORCE=1" in s.bridge.console_lines[-1]
    s.unregister(True)
    s.step(0.)
    assert s.identity is None and s.store.wiped == 1
    assert emitted(s, "unregister") == []
    assert s.bridge.console_lines[-1].endswith(
        "unregistered on this printer only")


def test_unregister_when_not_registered(new):
    new.unregister(True)
    new.step(0.)
    assert new.bridge.console_lines[-1] == (
        "Polar Cloud: this printer is not registered")
