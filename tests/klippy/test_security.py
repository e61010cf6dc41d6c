"""Hostile input and secrets, in a real klippy on the simulated MCU against
the local Polar Cloud.  R-numbers refer to the acceptance list in
docs/testing.md.

- Protocol abuse (R6): malformed, wrongly typed, 10 MB and unknown events,
  and a flood of 1,000 during a print; duplicate `print` (R10).
- Auth failures that need the user (R7) stop the retries.
- TLS is always verified (R17): self-signed, expired, wrong-host and
  unknown-CA certificates are refused with a clear status; a private CA
  works only through the `ca_file` option; nothing switches it off.
- Secrets (R9): PIN, private key, hello signatures and presigned upload
  fields never reach klippy.log, the console, get_status, or any file
  outside state_path; key 0600 in a 0700 folder.
- URL policy through redirects (R16), hostile file names (R14), disk full
  on a small tmpfs (R13), the command allow-list (R30).
"""
from __future__ import annotations

import os
import re
import stat
import subprocess

import pytest

from tests.testbed.gcode_files import demo_print
from tests.testbed.helpers import (
    EMAIL,
    EXTRA,
    PIN,
    StateHistory,
    final_reports,
    health_problems,
    log_size,
    polar_cfg,
    polar_lines,
    register,
    send_marker,
    start_provisioned,
    tree_digest,
    wait_online_again,
)
from tests.testbed.klippy import KlippyError
from tests.testbed.tlsproxy import TlsProxy, make_certs

TEN_MB = 10 * 1024 * 1024


@pytest.fixture(scope="module")
def k(online_klippy):
    """A printer that is registered and online (no camera)."""
    return online_klippy()


# ------------------------------------------------------------ protocol abuse

MALFORMED = [
    ("welcome", "x"), ("welcome", []), ("helloResponse", 12),
    ("print", []), ("print", "x"), ("print", {"jobId": ["a"]}),
    ("print", {"jobId": "ok-1", "gcodeFile": {"x": 1}}),
    ("pause", []), ("resume", 5), ("cancel", "now"),
    ("temperature", {"bed": "abc"}), ("temperature", {"tool0": "200\nM112"}),
    ("temperature", {"bed": 10 ** 400}), ("temperature", []),
    ("getUrlResponse", {"status": "SUCCESS", "expires": 10 ** 400}),
    ("capabilitiesResponse", "x"), ("customCommand", []),
    ("jogPrinter", {"jogPrinter": 5}), ("delete", {"serialNumber": 5}),
]


def test_malformed_and_oversized_events_are_dropped_quietly(k, sim):
    """Each malformed kind is dropped and logged at most once."""
    hellos = sim.connects(k.serial)
    log_at = log_size(k)
    for _ in range(3):
        for event, data in MALFORMED:
            sim.push(event, data, serial=k.serial)
    big = "A" * TEN_MB
    sim.push("print", {"jobId": "big-1", "jobName": big}, serial=k.serial)
    sim.push("print", {"jobId": big, "gcodeFile": big}, serial=k.serial)
    sim.push("welcome", {"challenge": big}, serial=k.serial)
    sim.push("noSuchEvent", big, serial=k.serial)
    sim.push("temperature", {"bed": big}, serial=k.serial)
    send_marker(sim, k.serial, "marker-abuse")
    lines = polar_lines(k, log_at)
    dropped = [line for line in lines if "dropped malformed" in line]
    kinds = [re.search(r"dropped malformed '(\w+)'", line).group(1)
             for line in dropped]
    assert len(kinds) == len(set(kinds)), dropped
    # The 10 MB ones never reach a decoder: one line for all of them
    oversized = [line for line in lines if "-byte '" in line]
    assert len(oversized) == 1 and "limit is" in oversized[0], lines
    # A print too large to read is still answered, if its id can be seen
    assert [j["state"] for j in sim.received("job", serial=k.serial)
            if j["jobId"] == "big-1"] == ["canceled"]
    assert not [line for line in lines if "could not handle" in line]
    assert all(len(line) < 1000 for line in lines)
    # The link stayed up, the printer did nothing it was not asked to
    assert sim.connects(k.serial) == hellos and sim.live_sessions(
        k.serial) == 1
    targets = k.query("extruder", "heater_bed")
    assert targets["extruder"]["target"] == 0. and targets[
        "heater_bed"]["target"] == 0.
    assert health_problems(k) == []
    assert sim.violations == []


# Waits for the console's "printing job" line, not for status 3 after the
# reconnect (a race), and runs before the flood test, whose print could
# still look busy for one 250 ms sample.
def test_duplicate_print_starts_once_even_across_a_reconnect(k, sim):
    """The same job 3x in a burst, then again after a reconnect."""
    text = demo_print(moves=60, hotend=0, bed=0, feedrate=1500)
    url = sim.add_file("dup-1.gcode", text.encode())
    since = sim.now()
    out = k.subscribe_output()
    for _ in range(3):
        sim.push_print(k.serial, "dup-1", gcode_url=url)
    out.wait_for(r"printing job '.*dup-1.gcode'", timeout=60)
    mark = k.hist.mark()
    sim.drop(k.serial, "reset")
    k.hist.wait_for(lambda st: st["state"] == "online",
                    since=k.hist.wait_index(lambda st: st["state"]
                                            != "online", since=mark))
    for _ in range(2):
        sim.push_print(k.serial, "dup-1", gcode_url=url)
    final = sim.wait_for("job", lambda d: d["jobId"] == "dup-1",
                         since=since, serial=k.serial, timeout=120)
    assert final["state"] == "completed"
    assert sim.file_requests("dup-1.gcode") == 1
    assert sum("printing job" in line for line in out.lines) == 1, out.lines
    out.close()
    assert len(final_reports(sim, k, "dup-1")) == 1
    assert sim.violations == []


def test_flood_during_a_print_disturbs_nothing(k, sim):
    """1,000 events in a burst while a local print runs."""
    hellos = sim.connects(k.serial)
    k.write_gcode("flood.gcode", demo_print(moves=100, hotend=0, bed=0,
                                            feedrate=1200))
    k.gcode("SDCARD_PRINT_FILE FILENAME=flood.gcode")
    k.subscribe_objects({"print_stats": ["state"]}).wait_for(
        lambda s: s["print_stats"]["state"] == "printing")
    log_at = log_size(k)
    kinds = [("temperature", {"bed": "abc"}), ("bogusEvent", {"x": 1}),
             ("command", {"command": "M112"}), ("print", []),
             ("update", {}), ("customCommand", {"command": "macro/X"})]
    for i in range(1000):
        event, data = kinds[i % len(kinds)]
        sim.push(event, dict(data, serialNumber=k.serial)
                 if isinstance(data, dict) else data, serial=k.serial)
    # A job pushed after the flood is still handled: refused, busy
    final = send_marker(sim, k.serial, "marker-flood")
    assert final["state"] == "canceled"
    lines = polar_lines(k, log_at)
    assert len(lines) <= 12, lines
    assert sim.connects(k.serial) == hellos
    ps = k.subscribe_objects({"print_stats": ["state"]}).wait_for(
        lambda s: s["print_stats"]["state"] == "complete", timeout=120)
    assert ps["print_stats"]["state"] == "complete"

    assert k.info()["state"] == "ready" and health_problems(k) == []
    assert sim.violations == []


# ------------------------------------------------------------- auth (R7)

# A window long enough for the normal backoff (2 then 4 s nominal, +/-50 %)
# to have tried at least once, likely twice; terminal failures must not
# try at all
QUIET_WINDOW = 9.


def assert_no_attempts(sim, since, window=QUIET_WINDOW):
    with pytest.raises(TimeoutError):
        sim.wait_until(lambda: sim.connection_attempts(since=since),
                       timeout=window, what="a connection attempt")


def status_text(k):
    out = k.subscribe_output()
    try:
        k.gcode("POLAR_STATUS")
        out.wait_for(r"Polar Cloud: ")
        return "\n".join(out.lines)
    finally:
        out.close()


def test_rejected_hello_waits_for_the_user(online_klippy, sim):
    """Hello FAILED -> auth_failed with the cloud's words, no retries
    (the one automatic retry is 30 minutes later)."""
    k = online_klippy()
    hist = k.hist
    sim.set_fault("hello_reply", {"status": "FAILED",
                                  "message": "key mismatch"})
    try:
        mark = hist.mark()
        sim.drop(k.serial, "reset")
        st = hist.wait_for(lambda s: s["state"] == "auth_failed", since=mark)
        t_failed = sim.now()
        assert "key mismatch" in st["last_error"]
        text = status_text(k)
        assert "Polar Cloud: auth_failed" in text and "key mismatch" in text
        assert_no_attempts(sim, t_failed)
        assert health_problems(k) == []
    finally:
        sim.set_fault("hello_reply", None)
        k.stop()


def test_deleted_and_refused_registrations_wait_for_the_user(online_klippy,
                                                              sim):
    """DELETED forgets the identity; EMAIL_PIN_ERROR and FORBIDDEN end a
    registration; after each, nothing connects until the user acts."""
    k = online_klippy()
    hist = k.hist
    sim.set_fault("hello_reply", "DELETED")
    try:
        mark = hist.mark()
        sim.drop(k.serial, "reset")
        hist.wait_for(lambda s: s["state"] == "unregistered", since=mark)
    finally:
        sim.set_fault("hello_reply", None)
    assert not (k.state_path / "key.pem").exists()
    assert "not registered" in status_text(k)
    out = k.subscribe_output()
    k.gcode("POLAR_REGISTER EMAIL=%s PIN=0000" % (EMAIL,))
    line = out.wait_for(r"registration failed: .*", timeout=90)
    assert "e-mail and PIN were not accepted" in line
    sim.set_fault("register_reply", {"status": "FAILED",
                                      "reason": "FORBIDDEN"})
    k.gcode("POLAR_REGISTER EMAIL=%s PIN=%s" % (EMAIL, PIN))
    line = out.wait_for(r"registration failed: .*", timeout=90)
    out.close()
    assert "already registered to another account" in line
    st = hist.wait_for(lambda s: s["state"] == "unregistered"
                       and "another account" in s["last_error"])
    assert not st["registered"]
    t_failed = sim.now()
    # The registration connection is closed (others on this sim are
    # authenticated printers)
    sim.wait_until(lambda: not [s for s in sim.sessions.values()
                                if not s.authenticated], timeout=30)
    assert_no_attempts(sim, t_failed)
    assert health_problems(k) == []
    k.stop()


# ------------------------------------------------------------ TLS (R17)

@pytest.fixture(scope="module")
def tls(sim, tmp_path_factory):
    certs = make_certs(tmp_path_factory.mktemp("certs"))
    proxy = TlsProxy(("127.0.0.1", sim.port), certs["good"]).start()
    proxy.certs = certs
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def tk(make_klippy, sim, tls):
    """A registered printer whose server_url is the TLS terminator."""
    k = start_provisioned(make_klippy, sim, server_url=tls.url)
    k.hist = StateHistory.attach(k)
    return k


def reconfigure(k, **options):
    k.extra_cfg = polar_cfg(k.server_url, **options)
    k.write_config()
    k.restart()


@pytest.mark.parametrize("cert,with_ca,reason", [
    ("self_signed", True, "self-signed certificate"),
    ("expired", True, "certificate has expired"),
    ("wrong_host", True, "mismatch"),
    ("good", False, "unable to get local issuer certificate"),
])
def test_tls_verification_failures_are_refused(tk, sim, tls, cert, with_ca,
                                               reason):
    tk.server_url = tls.url
    tls.use(tls.certs[cert])
    hellos = sim.connects(tk.serial)
    opts = {"ca_file": tls.certs["ca"]["cert"]} if with_ca else {}
    before = tls.counts()[0]
    reconfigure(tk, **opts)
    st = tk.hist.wait_for(lambda s: s["state"] == "backoff"
                          and s["retries"] >= 2, since=tk.hist.mark() - 1)
    handshakes = tls.counts()[0] - before
    assert st["last_error"].startswith("TLS verification failed: "), st
    assert reason in st["last_error"], st
    # Backoff applies: one handshake per scheduled attempt, no hammering
    assert handshakes in (st["retries"], st["retries"] + 1), handshakes
    # Nothing went past TLS: no Socket.IO connection, no hello
    assert sim.connects(tk.serial) == hellos
    out = tk.subscribe_output()
    tk.gcode("POLAR_STATUS")
    line = out.wait_for(r"last error: .*")
    out.close()
    assert "TLS verification failed" in line
    assert health_problems(tk) == []


def test_private_ca_works_only_through_ca_file(tk, sim, tls):
    tk.server_url = tls.url
    tls.use(tls.certs["good"])
    hellos = sim.connects(tk.serial)
    reconfigure(tk, ca_file=tls.certs["ca"]["cert"])
    tk.hist.wait_for(lambda s: s["state"] == "online",
                     since=tk.hist.mark() - 1)
    assert sim.connects(tk.serial) == hellos + 1
    assert sim.violations == []


def test_tls_verification_cannot_be_switched_off(tk, sim, tls):
    tk.server_url = tls.url
    for options, message in [
            ({"ca_file": "/nonexistent/ca.pem"}, "'ca_file'"),
            ({"ssl_verify": "False"}, "ssl_verify"),
            ({"verify_tls": "False"}, "verify_tls"),
            ({"insecure": "True"}, "insecure")]:
        with pytest.raises(KlippyError):
            reconfigure(tk, **options)
        assert re.search(message, tk.info().get("state_message", "")), \
            tk.info()
    reconfigure(tk, ca_file=tls.certs["ca"]["cert"])
    # ...and no code path can do it either
    source = "".join(p.read_text() for p in EXTRA.glob("*.py"))
    for needle in ("verify=False", "ssl_verify=False", "CERT_NONE",
                   "check_hostname = False", "check_hostname=False",
                   "_create_unverified_context", "verify = False"):
        assert needle not in source, needle


# -------------------------------------------------------- secrets (R9)

def test_secrets_stay_in_state_path(polar_klippy, sim, camera_server):
    """After registration, hellos, snapshot uploads, an M112 and a
    FIRMWARE_RESTART: no secret outside state_path."""
    k = polar_klippy("klipper", webcam_enabled="True",
                     snapshot_url=camera_server.snapshot_url,
                     snapshot_interval=5)
    out = k.subscribe_output()
    serial = register(k, sim)
    sim.wait_upload(timeout=60, predicate=lambda up: True)
    k.restart()
    sim.wait_until(lambda: sim.live_sessions(serial) == 1, timeout=60)
    k.gcode("POLAR_STATUS")
    k.mcu.shutdown("Timer too close")
    k.wait_state("shutdown")
    k.restart(firmware=True)
    sim.wait_until(lambda: sim.live_sessions(serial) == 1, timeout=60)
    secrets = {"PIN": PIN}
    with open(k.state_path / "key.pem") as f:
        key = f.read()
    secrets.update({"key line %d" % i: line for i, line in enumerate(
        key.splitlines()) if len(line) > 40})
    for i, hello in enumerate(sim.received("hello", serial=serial)):
        secrets["signature %d" % i] = hello["signature"][:40]
    for i, reply in enumerate(sim.sent("getUrlResponse")):
        fields = reply.get("fields") if isinstance(reply, dict) else None
        if reply.get("status") == "SUCCESS" and isinstance(fields, dict):
            for name, value in fields.items():
                if isinstance(value, str) and len(value) >= 16:
                    secrets["%s %d" % (name, i)] = value[:60]
    secrets["upload url"] = sim.url + "/upload"
    assert len(secrets) > 10
    # Everything a user or a front-end can see
    texts = {"klippy.log": k.log_text(),
             "console": "\n".join(out.lines),
             "get_status": repr(k.query("polar_cloud", "configfile")),
             "webhooks": repr(k.call("polar_cloud/status"))}
    out.close()
    for root, _dirs, files in os.walk(k.workdir):
        if os.path.commonpath([root, k.state_path]) == str(k.state_path):
            continue
        for name in files:
            path = os.path.join(root, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    texts[path] = f.read().decode("utf-8", "replace")
    leaks = [(what, where) for where, text in texts.items()
             for what, secret in secrets.items() if secret in text]
    assert leaks == []
    # The key: 0600 in a 0700 folder; every state file private
    assert stat.S_IMODE(os.stat(k.state_path).st_mode) == 0o700
    for name in os.listdir(k.state_path):
        mode = stat.S_IMODE(os.stat(k.state_path / name).st_mode)
        assert mode == 0o600, (name, oct(mode))
    assert "PRIVATE KEY" in key
    k.stop()


# ----------------------------------------------------- URL policy (R16)

@pytest.mark.parametrize("job_id,target,reason", [
    ("redir-private", "http://10.1.2.3/x.gcode", "plain http"),
    ("redir-private-s", "https://10.1.2.3/x.gcode", "not public"),
    ("redir-meta", "https://169.254.169.254/latest", "not public"),
    ("redir-file", "file:///etc/passwd", "not an acceptable URL"),
    ("redir-hops", None, "too many redirects"),
])
def test_redirects_to_forbidden_places_are_refused(k, sim, job_id, target,
                                                   reason):
    opts = {"target": target} if target else {"hops": 5}
    url = sim.add_file("%s.gcode" % (job_id,), b"G28\n", "redirect", **opts)
    since = sim.now()
    out = k.subscribe_output()
    sim.push_print(k.serial, job_id, gcode_url=url)
    final = sim.wait_for("job", lambda d: d["jobId"] == job_id, since=since,
                         serial=k.serial, timeout=60)
    line = out.wait_for(r"job %s failed: .*" % (job_id,))
    out.close()
    assert final["state"] == "canceled" and reason in line, line
    # The redirect was read, nothing beyond it was fetched (a chain: the
    # first hop and three more redirects, never the fifth)
    name = "%s.gcode" % (job_id,)
    hops = [sim.file_requests(name)] + [
        sim.file_requests("%s.r%d" % (name, i)) for i in range(1, 5)]
    assert hops == ([1, 1, 1, 1, 0] if target is None else [1, 0, 0, 0, 0])
    assert not [f for f in os.listdir(k.gcodes_dir) if job_id in f]


# ------------------------------------------------- names and paths (R14)

def test_hostile_job_name_only_creates_the_job_file(k, sim):
    config = tree_digest(k.config_dir)
    outside = {p for p in os.listdir(k.workdir)}
    before = set(os.listdir(k.gcodes_dir))
    name = "../../config/\x00printer.cfg/" + "\u00fc\u00f1\u00ee" * 100
    url = sim.add_file("name-1.gcode", demo_print(
        moves=5, hotend=0, bed=0).encode())
    since = sim.now()
    sim.push_print(k.serial, "name-1", job_name=name, gcode_url=url)
    final = sim.wait_for("job", lambda d: d["jobId"] == "name-1",
                         since=since, serial=k.serial, timeout=90)
    assert final["state"] == "completed"
    created = set(os.listdir(k.gcodes_dir)) - before
    assert len(created) == 1
    [made] = created
    assert re.fullmatch(r"[A-Za-z0-9_.-]+_polar-name-1\.gcode", made), made
    assert tree_digest(k.config_dir) == config
    assert set(os.listdir(k.workdir)) == outside


# --------------------------------------------------------- disk full (R13)

@pytest.fixture
def small_disk(make_klippy, sim, tmp_path):
    """A printer whose G-code folder is a 70 MB tmpfs."""
    k = start_provisioned(make_klippy, sim, start=False)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=70m",
                              "tmpfs", str(k.gcodes_dir)],
                             capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        k.start()
        k.hist = StateHistory.attach(k)
        k.hist.wait_for(lambda st: st["state"] == "online", since=0)
        yield k
    finally:
        k.stop()
        subprocess.run(["umount", "-l", str(k.gcodes_dir)])


def test_disk_full_before_and_during_a_download(small_disk, sim):
    k = small_disk
    out = k.subscribe_output()
    # 1) Not enough room for the file plus the safety margin: refused
    # before a byte is written
    big = b"G28\n" + b"G1 X1 Y1\n" * (1024 * 1024)          # ~9 MB
    url = sim.add_file("full-1.gcode", big)
    since = sim.now()
    sim.push_print(k.serial, "full-1", gcode_url=url)
    final = sim.wait_for("job", lambda d: d["jobId"] == "full-1",
                         since=since, serial=k.serial, timeout=60)
    line = out.wait_for(r"job full-1 failed: .*")
    assert final["state"] == "canceled" and "disk space" in line
    # 2) Room at the start (2 MB + the 64 MB margin fit in 70 MB), then
    # the disk fills up mid-way (ENOSPC)
    filler = k.gcodes_dir / "filler.bin"
    url = sim.add_file("full-2.gcode", big[:2 * 1024 * 1024], "slow",
                       rate=256 * 1024)
    since = sim.now()
    sim.push_print(k.serial, "full-2", gcode_url=url)
    sim.wait_until(lambda: sim.file_requests("full-2.gcode") == 1)
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    final = sim.wait_for("job", lambda d: d["jobId"] == "full-2",
                         since=since, serial=k.serial, timeout=90)
    line = out.wait_for(r"job full-2 failed: .*")
    out.close()
    assert final["state"] == "canceled"
    assert "No space left" in line or "disk space" in line, line
    os.unlink(filler)
    assert os.listdir(k.gcodes_dir) == []
    assert health_problems(k) == []
    # One line of the failure (plus the console echo), no traceback
    errors = [line for line in polar_lines(k) if "full-2" in line
              and ("No space" in line or "disk space" in line)]
    assert 1 <= len(errors) <= 2, errors


# ------------------------------------------------- allow-list (R30)

def test_command_allow_list(k, sim):
    # A new session: earlier floods used up this period's audit lines
    k.restart()
    wait_online_again(k, sim)
    log_at = log_size(k)
    sim.command(k.serial, "M112")
    sim.jog_printer(k.serial, {"command": "home", "axes": ["x"]})
    sim.update(k.serial)
    sim.custom_command(k.serial, "macro/SAVE_CONFIG")
    sim.connect_printer(k.serial)
    for bad in ("abc", -5, 9999, "200\nM112", "200;M112", None, [200]):
        sim.temperature(k.serial, bed=bad)
    send_marker(sim, k.serial, "marker-allow")
    lines = polar_lines(k, log_at)
    for audit in ("cloud command: refused (allow_raw_gcode is off)",
                  "cloud jogPrinter: refused (allow_jog is off)",
                  "cloud update: not supported",
                  "cloud customCommand: refused, not a listed macro",
                  "cloud connectPrinter: not supported"):
        assert sum(audit in line for line in lines) == 1, (audit, lines)
    targets = k.query("heater_bed", "toolhead")
    # -5 clamps to 0, 9999 to max_temp (150): only numbers ever run
    assert targets["heater_bed"]["target"] in (0., 150.)
    assert targets["toolhead"]["homed_axes"] == ""
    assert k.info()["state"] == "ready" and health_problems(k) == []
    sim.temperature(k.serial, bed=0)
