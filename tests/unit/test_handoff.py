"""The one-time registration file between scripts/register.sh and the
module (handoff.py), and the session's side of it, without klippy: a fake
bridge and a fake Socket.IO client, real files in a temporary state
folder."""
from __future__ import annotations

import json
import os
import stat
import time
from typing import Any

import pytest

from klippy_extras.polar_cloud import handoff, states
from klippy_extras.polar_cloud import session as S
from klippy_extras.polar_cloud.identity import Identity
from klippy_extras.polar_cloud.options import CameraOptions, Options

EMAIL = "teacher@school.example.org"
PIN = "Qw3rty9"


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def leftovers(state) -> list[str]:
    return sorted(os.listdir(state))


# ------------------------------------------------------------ the files

def test_request_is_private_whole_and_taken_once(tmp_path):
    state = tmp_path / "polar_cloud"
    rid = handoff.write_request(str(state), EMAIL, PIN)
    assert mode(state) == 0o700
    path = state / handoff.REQUEST_FILE
    assert mode(path) == 0o600
    assert json.loads(path.read_text()) == {
        "format": 1, "id": rid, "email": EMAIL, "pin": PIN}
    assert leftovers(state) == [handoff.REQUEST_FILE]     # no temp file
    req = handoff.take_request(str(state))
    assert (req.request_id, req.email, req.pin) == (rid, EMAIL, PIN)
    assert PIN not in repr(req)
    # Read and deleted at once: nothing left, nothing to take twice
    assert leftovers(state) == []
    assert handoff.take_request(str(state)) is None
    assert handoff.withdraw_request(str(state)) is False


def test_an_open_state_folder_is_closed_first(tmp_path):
    state = tmp_path / "polar_cloud"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    handoff.write_request(str(state), EMAIL, PIN)
    assert mode(state) == 0o700


def test_no_state_folder_means_no_request(tmp_path):
    assert handoff.take_request(str(tmp_path / "missing")) is None


def test_a_second_request_never_replaces_a_waiting_one(tmp_path):
    state = str(tmp_path)
    first = handoff.write_request(state, EMAIL, PIN)
    with pytest.raises(handoff.HandoffError, match="already waiting"):
        handoff.write_request(state, "other@example.org", "1234")
    assert handoff.take_request(state).request_id == first
    assert leftovers(state) == []


def test_withdraw_removes_an_untaken_request(tmp_path):
    state = str(tmp_path)
    handoff.write_request(state, EMAIL, PIN)
    assert handoff.request_waiting(state)
    assert handoff.withdraw_request(state) is True
    assert leftovers(state) == []
    assert handoff.take_request(state) is None


def test_result_is_private_matched_by_id_and_deleted_once_read(tmp_path):
    state = str(tmp_path)
    rid = handoff.write_request(state, EMAIL, PIN)
    handoff.take_request(state)
    handoff.write_result(state, "someoneelse", True, serial="KL000001")
    assert handoff.take_result(state, rid) is None          # not ours
    handoff.write_result(state, rid, False, reason="the e-mail and PIN were"
                         " not accepted")
    assert mode(os.path.join(state, handoff.RESULT_FILE)) == 0o600
    assert handoff.take_result(state, rid) == {
        "format": 1, "id": rid, "ok": False, "serial": "",
        "reason": "the e-mail and PIN were not accepted", "already": False}
    assert leftovers(state) == []
    assert handoff.take_result(state, rid) is None


def test_a_stale_result_is_cleared_by_the_next_request(tmp_path):
    state = str(tmp_path)
    handoff.write_result(state, "old", True, serial="KL000009")
    handoff.write_request(state, EMAIL, PIN)
    assert leftovers(state) == [handoff.REQUEST_FILE]


@pytest.mark.parametrize("content,error", [
    (b"not json", "not JSON"),
    (b"[1, 2]", "malformed"),
    (b'{"id": "abc", "email": "a@b.org"}', "malformed"),
    (b'{"id": "../x", "email": "a@b.org", "pin": "1"}', "malformed"),
    (b"x" * (handoff.MAX_SIZE + 1), "too big"),
])
def test_unusable_requests_are_refused_and_deleted(tmp_path, content, error):
    path = tmp_path / handoff.REQUEST_FILE
    path.write_bytes(content)
    with pytest.raises(handoff.HandoffError, match=error):
        handoff.take_request(str(tmp_path))
    assert leftovers(tmp_path) == []


def test_a_symlinked_request_is_not_followed(tmp_path):
    secret = tmp_path / "elsewhere"
    secret.write_text(json.dumps({"id": "a1", "email": EMAIL, "pin": PIN}))
    state = tmp_path / "state"
    state.mkdir()
    (state / handoff.REQUEST_FILE).symlink_to(secret)
    with pytest.raises(handoff.HandoffError, match="symbolic link"):
        handoff.take_request(str(state))
    assert leftovers(state) == [] and secret.exists()


def test_an_old_forgotten_request_is_refused_with_its_id(tmp_path):
    state = str(tmp_path)
    rid = handoff.write_request(state, EMAIL, PIN)
    later = time.time() + handoff.MAX_AGE + 60
    with pytest.raises(handoff.HandoffError, match="too old") as exc:
        handoff.take_request(state, now=later)
    assert exc.value.request_id == rid and PIN not in str(exc.value)
    assert leftovers(state) == []


def test_leftovers_of_killed_writers_are_swept(tmp_path):
    """A script or klippy killed between writing and deleting a working
    file: the session's first check removes it, once it is old."""
    names = [handoff.TAKEN_FILE, ".register.tmp-abc123",
             ".register.request.withdrawn-42"]
    for name in names:
        (tmp_path / name).write_text(PIN)
    (tmp_path / "key.pem").write_text("key")
    (tmp_path / handoff.REQUEST_FILE).write_text("{}")
    assert handoff.sweep(str(tmp_path)) == 0            # too fresh
    later = time.time() + handoff.SWEEP_AGE + 1
    assert handoff.sweep(str(tmp_path), now=later) == 3
    assert leftovers(tmp_path) == ["key.pem", handoff.REQUEST_FILE]
    assert handoff.sweep(str(tmp_path / "missing")) == 0


def test_a_folder_of_another_user_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(tmp_path).st_uid + 1)
    with pytest.raises(handoff.HandoffError, match="another user"):
        handoff.write_request(str(tmp_path), EMAIL, PIN)
    assert leftovers(tmp_path) == []


# ------------------------------------------------------ the session side

class FakeBridge:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def console(self, text: str, error: bool = False, log: bool = True):
        self.lines.append(text)

    def call(self, fn, *args) -> None:
        pass

    def run_gcode(self, script: str, reply) -> None:
        pass


class FakeSio:
    def __init__(self) -> None:
        self.connected = False
        self.emits: list[tuple[str, Any]] = []
        self.eio = None

    def connect(self, url, **kw) -> None:
        self.connected = True

    def emit(self, event: str, data, callback=None) -> None:
        self.emits.append((event, data))

    def disconnect(self) -> None:
        self.connected = False


class FakeStore:
    def public_pem(self) -> str:
        return "-----BEGIN PUBLIC KEY-----\nx\n-----END PUBLIC KEY-----\n"

    def machine(self) -> dict:
        return {"mac": "02:00:00:00:00:01", "mfg_sn": "KL-020000000001"}

    def save(self, serial: str, server: str) -> Identity:
        return Identity(serial, "02:00:00:00:00:01", "KL-020000000001",
                        server, "fp")

    def load_key(self):
        return "pem"

    def save_machine(self) -> None:
        pass


def make_session(state) -> S.CloudSession:
    sios: list[FakeSio] = []

    def factory(inbox, verify, timeout, proxy=None):
        sios.append(FakeSio())
        return sios[-1]
    opts = Options(
        server_url="http://127.0.0.1:1", state_path=str(state),
        manufacturer="kl", printer_make="Cartesian",
        machine_type="Cartesian", status_interval=60., active_interval=10.,
        verbose=False, max_job_size=1 << 20, allow_raw_gcode=False,
        allow_jog=False, cloud_macros=(),
        camera=CameraOptions(enabled=False))
    s = S.CloudSession(opts, FakeBridge(), "0.0", client_factory=factory)
    s.store = FakeStore()
    s.sios = sios
    s.state = states.UNREGISTERED
    return s


def run_posted(s: S.CloudSession) -> None:
    """Run what klippy's side posted to the session thread."""
    while (item := s.inbox.get(0.)) is not None:
        s._handle(*item)


def poll(s: S.CloudSession) -> None:
    s.auth.handoff_checked = 0.          # due now, however soon after the last
    s.auth.poll_handoff(time.monotonic())


def register_reply(s: S.CloudSession, reply: dict) -> None:
    s._dispatch("welcome", {"challenge": "c" * 16})
    assert s.state == states.REGISTERING
    s._dispatch("registerResponse", reply)


def test_session_registers_from_the_file_and_answers(tmp_path):
    s = make_session(tmp_path)
    rid = handoff.write_request(str(tmp_path), EMAIL, PIN)
    poll(s)
    assert leftovers(tmp_path) == []            # read and deleted at once
    assert s.state == states.CONNECTING and s.auth.handoff_id == rid
    register_reply(s, {"status": "SUCCESS", "reason": "SUCCESS",
                       "serialNumber": "KL000007"})
    sent = [d for e, d in s.sios[0].emits if e == "register"]
    assert sent[0]["email"] == EMAIL and sent[0]["pin"] == PIN
    result = handoff.take_result(str(tmp_path), rid)
    assert result["ok"] and result["serial"] == "KL000007"
    assert PIN not in json.dumps(result)
    lines = s.bridge.lines
    assert any("registering as t***@school.example.org (requested from the"
               " shell)" in line for line in lines), lines
    assert any("registered, serial number KL000007" in line for line in lines)
    # From the shell, nothing to warn about
    assert not any("console history" in line for line in lines), lines
    assert not any(PIN in line for line in lines)
    assert s.auth.handoff_id is None and leftovers(tmp_path) == []


def test_session_answers_the_clouds_reason(tmp_path):
    s = make_session(tmp_path)
    rid = handoff.write_request(str(tmp_path), EMAIL, "0000")
    poll(s)
    register_reply(s, {"status": "FAILED", "reason": "EMAIL_PIN_ERROR"})
    result = handoff.take_result(str(tmp_path), rid)
    assert not result["ok"] and "e-mail and PIN were not accepted" \
        in result["reason"]
    assert s.state == states.UNREGISTERED


def test_console_registration_says_where_the_pin_stays(tmp_path):
    s = make_session(tmp_path)
    s.register(EMAIL, PIN)
    run_posted(s)
    register_reply(s, {"status": "SUCCESS", "reason": "SUCCESS",
                       "serialNumber": "KL000008"})
    note = [line for line in s.bridge.lines if "console history" in line]
    assert len(note) == 1 and "scripts/register.sh" in note[0]
    assert PIN not in note[0]
    assert leftovers(tmp_path) == []        # no result for nobody


@pytest.mark.parametrize("setup,email,pin,expected,already", [
    ("registered", EMAIL, PIN, "already registered as KL000042", True),
    ("disabled", EMAIL, PIN, "missing Python packages", False),
    ("registering", EMAIL, PIN, "already in progress", False),
    ("", "not-an-email", PIN, "does not look like an e-mail", False),
    ("", EMAIL, "12 34", "letters and digits", False),
])
def test_session_refuses_what_the_console_refuses(tmp_path, setup, email, pin,
                                                   expected, already):
    s = make_session(tmp_path)
    if setup == "registered":
        s.identity = Identity("KL000042", "m", "s", "u", "fp")
        s.state = states.ONLINE
    elif setup == "disabled":
        s.state, s.last_error = states.DISABLED, "missing Python packages: x"
    elif setup == "registering":
        s.state = states.REGISTERING
    rid = handoff.write_request(str(tmp_path), email, pin)
    poll(s)
    result = handoff.take_result(str(tmp_path), rid)
    assert result["ok"] is False and expected in result["reason"]
    assert result["already"] is already
    assert result["serial"] == ("KL000042" if already else "")
    assert s.sios == [] and leftovers(tmp_path) == []
    assert pin not in json.dumps(result)


def test_a_failure_inside_the_registration_is_answered(tmp_path):
    s = make_session(tmp_path)

    def broken():
        raise RuntimeError("injected")
    s.store.save_machine = broken
    rid = handoff.write_request(str(tmp_path), EMAIL, PIN)
    with pytest.raises(RuntimeError):           # the supervisor logs it
        poll(s)
    result = handoff.take_result(str(tmp_path), rid)
    assert result["ok"] is False and "internal error" in result["reason"]
    assert s.auth.handoff_id is None


def test_session_checks_at_most_once_a_second(tmp_path):
    s = make_session(tmp_path)
    now = time.monotonic() + 10.
    s.auth.poll_handoff(now)
    handoff.write_request(str(tmp_path), EMAIL, PIN)
    s.auth.poll_handoff(now + .5)
    assert handoff.request_waiting(str(tmp_path))
    s.auth.poll_handoff(now + 1.)
    assert not handoff.request_waiting(str(tmp_path))


def test_the_first_check_sweeps_leftovers(tmp_path):
    s = make_session(tmp_path)
    old = tmp_path / ".register.tmp-x"
    old.write_text(PIN)
    t = time.time() - handoff.SWEEP_AGE - 5
    os.utime(old, (t, t))
    s.auth.poll_handoff(time.monotonic())
    assert leftovers(tmp_path) == []


def test_a_stopping_session_leaves_the_request_to_the_next(tmp_path):
    s = make_session(tmp_path)
    handoff.write_request(str(tmp_path), EMAIL, PIN)
    s.stop_event.set()
    poll(s)
    assert handoff.request_waiting(str(tmp_path))


def test_a_broken_request_is_answered_without_crashing(tmp_path, caplog):
    s = make_session(tmp_path)
    rid = handoff.write_request(str(tmp_path), EMAIL, PIN)
    path = tmp_path / handoff.REQUEST_FILE
    os.utime(path, (time.time() - 2 * handoff.MAX_AGE,) * 2)
    poll(s)
    result = handoff.take_result(str(tmp_path), rid)
    assert "too old" in result["reason"]
    assert PIN not in caplog.text and leftovers(tmp_path) == []
    # Garbage without an id: logged, deleted, nobody to answer
    path.write_bytes(b"\x00garbage")
    poll(s)
    assert leftovers(tmp_path) == [] and "not JSON" in caplog.text
