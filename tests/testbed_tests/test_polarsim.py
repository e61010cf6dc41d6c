"""Tests of the Polar Cloud simulator with a real python-socketio client."""

from __future__ import annotations

import base64
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
import socketio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.testbed.polarsim import DEFAULT_EMAIL, DEFAULT_PIN, PolarSim

pytestmark = pytest.mark.timeout(60)

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
MAC = "B8:27:EB:12:34:56"
MFG_SN = "KL-B827EB123456"
JPEG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 2 + b"\xff\xd9"
BAD_PEM = "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def public_pem(key: rsa.RSAPrivateKey, fmt: str = "spki") -> str:
    kind = (
        serialization.PublicFormat.SubjectPublicKeyInfo
        if fmt == "spki"
        else serialization.PublicFormat.PKCS1
    )
    return key.public_key().public_bytes(serialization.Encoding.PEM, kind).decode()


def sign(key: rsa.RSAPrivateKey, challenge: str) -> str:
    raw = key.sign(challenge.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())
    return base64.b64encode(raw).decode("ascii")


def register_payload(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "mfg": "kl",
        "email": DEFAULT_EMAIL,
        "pin": DEFAULT_PIN,
        "publicKey": public_pem(KEY),
        "mfgSn": MFG_SN,
        "myInfo": {"MAC": MAC},
    }
    d.update(over)
    return {k: v for k, v in d.items() if v is not None}


def hello_payload(
    serial: str, challenge: str, key: rsa.RSAPrivateKey = KEY, **over: Any
) -> dict[str, Any]:
    d: dict[str, Any] = {
        "serialNumber": serial,
        "signature": sign(key, challenge),
        "MAC": MAC,
        "protocol": "2",
        "mfgSn": MFG_SN,
        "printerMake": "Cartesian",
        "version": "0.1.0",
        "localIP": "127.0.0.1",
        "camUrl": "",
        "camOff": 1,
        "rotateImg": 0,
        "transformImg": 0,
    }
    d.update(over)
    return {k: v for k, v in d.items() if v is not None}


class _ListHandler(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__()
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())


class FakePrinter:
    """A scripted printer: a real socketio.Client feeding a queue."""

    def __init__(self, sim: PolarSim, transports: tuple[str, ...] = ("websocket",)):
        self.sim = sim
        self.transports = list(transports)
        self.inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        # the client's Engine.IO warnings tell how a link died
        self.warnings: list[str] = []
        log = logging.getLogger(f"test_polarsim.printer.{id(self)}")
        log.setLevel(logging.WARNING)
        log.propagate = False
        log.addHandler(_ListHandler(self.warnings))
        self.sio = socketio.Client(
            reconnection=False,
            handle_sigint=False,
            request_timeout=2,
            engineio_logger=log,
        )
        self.sio.on("*", self._on_event)
        self.sio.on("disconnect", lambda *a: self.inbox.put(("disconnect", None)))
        self.challenge: str | None = None

    def _on_event(self, event: str, *args: Any) -> None:
        self.inbox.put((event, args[0] if len(args) == 1 else list(args)))

    def connect(self, welcome: bool = True) -> FakePrinter:
        self.sio.connect(self.sim.url, transports=self.transports, wait_timeout=5)
        if welcome:
            self.challenge = self.expect("welcome")["challenge"]
        return self

    def expect(self, name: str, timeout: float = 5.0) -> Any:
        """Next event called ``name``; fails on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                event, data = self.inbox.get(timeout=max(left, 0.001))
            except queue.Empty:
                pytest.fail(f"printer did not receive {name!r} within {timeout}s")
            if event == name:
                return data

    def next_event(self, timeout: float = 5.0) -> tuple[str, Any]:
        return self.inbox.get(timeout=timeout)

    def emit(self, name: str, data: Any) -> None:
        self.sio.emit(name, data)

    def hello(self, serial: str, key: rsa.RSAPrivateKey = KEY, **over: Any) -> Any:
        assert self.challenge is not None
        self.emit("hello", hello_payload(serial, self.challenge, key, **over))
        return self.expect("helloResponse")

    def close(self) -> None:
        if self.sio.connected:
            self.sio.disconnect()
        self.sio.shutdown()


@pytest.fixture
def sim():
    s = PolarSim(ping_interval=5, ping_timeout=5).start()
    yield s
    s.stop()


@pytest.fixture
def fast_sim():
    """Short ping so that dead links are detected in ~2 s."""
    s = PolarSim(ping_interval=1, ping_timeout=1).start()
    yield s
    s.stop()


@pytest.fixture
def printers():
    made: list[FakePrinter] = []

    def make(
        sim: PolarSim, transports: tuple[str, ...] = ("websocket",)
    ) -> FakePrinter:
        p = FakePrinter(sim, transports)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def provision(sim: PolarSim, key: rsa.RSAPrivateKey = KEY, mac: str = MAC) -> str:
    return sim.add_printer(public_pem(key), mac=mac, mfg_sn=MFG_SN)


def online(
    sim: PolarSim, printers, serial: str, key: rsa.RSAPrivateKey = KEY, **over: Any
) -> FakePrinter:
    p = printers(sim).connect()
    assert p.hello(serial, key, **over) == {"status": "SUCCESS"}
    return p


# --- connection and welcome ----------------------------------------------------


def test_welcome_challenge_is_new_per_connection(sim, printers):
    a = printers(sim).connect()
    b = printers(sim).connect()
    assert isinstance(a.challenge, str) and len(a.challenge) >= 16
    assert a.challenge != b.challenge
    assert sim.connects() == 2
    assert len(sim.sent("welcome")) == 2
    assert sim.connection_attempts(outcome="open")
    assert sim.violations == []


def test_polling_transport_works(fast_sim, printers):
    sim = fast_sim  # the client's polling disconnect may wait one ping interval
    serial = provision(sim)
    p = printers(sim, ("polling",)).connect()
    assert p.hello(serial) == {"status": "SUCCESS"}
    p.emit("status", {"serialNumber": serial, "status": 0})
    assert sim.wait_for("status", timeout=5)["status"] == 0
    assert sim.violations == []


# --- register ------------------------------------------------------------------


def test_register_success_and_same_serial_again(sim, printers):
    p = printers(sim).connect()
    p.emit("register", register_payload())
    reply = p.expect("registerResponse")
    assert reply["status"] == "SUCCESS" and reply["reason"] == "SUCCESS"
    serial = reply["serialNumber"]
    assert serial.startswith("KL") and len(serial) == 8 and serial[2:].isdigit()

    q = printers(sim).connect()
    q.emit("register", register_payload(publicKey=public_pem(KEY, "pkcs1")))
    assert q.expect("registerResponse")["serialNumber"] == serial

    r = printers(sim).connect()
    r.emit("register", register_payload(myInfo={"MAC": "B8:27:EB:00:00:01"}))
    assert r.expect("registerResponse")["serialNumber"] != serial
    assert sim.violations == []


def test_register_from_a_known_mac_gets_that_printers_serial(sim, printers):
    """Several printers on one host: one MAC each, one printer each."""
    mac2, sn2 = "BA:5F:04:98:51:FC", "KL-BA5F049851FC"
    second = {"publicKey": public_pem(OTHER_KEY), "mfgSn": sn2, "myInfo": {"MAC": mac2}}
    p = printers(sim).connect()
    p.emit("register", register_payload())
    serial1 = p.expect("registerResponse")["serialNumber"]
    p.emit("register", register_payload(**second))
    serial2 = p.expect("registerResponse")["serialNumber"]
    assert serial1 != serial2
    online(sim, printers, serial1)
    online(sim, printers, serial2, OTHER_KEY, MAC=mac2, mfgSn=sn2)
    assert sim.live_sessions(serial1) == 1 and sim.live_sessions(serial2) == 1
    # Registering again from a MAC the cloud knows: that printer's serial.
    p.emit("register", register_payload(**second))
    assert p.expect("registerResponse")["serialNumber"] == serial2
    assert sim.printer(serial2).mac == mac2 and sim.printer(serial2).mfg_sn == sn2
    assert len(sim.printers) == 2
    assert sim.violations == []


def test_two_printers_sending_one_mac_are_one_printer(sim, printers):
    # What two klippy instances on one host did while they shared the
    # host's MAC: the second registration takes the first one's printer.
    p = printers(sim).connect()
    p.emit("register", register_payload())
    serial = p.expect("registerResponse")["serialNumber"]
    q = printers(sim).connect()
    q.emit("register", register_payload(publicKey=public_pem(OTHER_KEY)))
    assert q.expect("registerResponse")["serialNumber"] == serial
    r = printers(sim).connect()
    assert r.hello(serial, KEY)["status"] == "FAILED"  # its key was replaced
    online(sim, printers, serial, OTHER_KEY)
    assert len(sim.printers) == 1


def test_hello_from_another_mac_is_a_violation(sim, printers):
    serial = provision(sim)
    online(sim, printers, serial, MAC="B8:27:EB:00:00:09")
    assert any("hello.MAC 'B8:27:EB:00:00:09' != registered" in v
               for v in sim.violations)


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"mfg": "zz"}, "MFG_UNKNOWN"),
        ({"mfg": "KL"}, "MFG_UNKNOWN"),  # codes are case-sensitive
        ({"pin": "9999"}, "EMAIL_PIN_ERROR"),
        ({"email": "nobody@example.com"}, "EMAIL_PIN_ERROR"),
        ({"publicKey": ""}, "INVALID_KEY"),
        ({"publicKey": BAD_PEM}, "INVALID_KEY"),
    ],
)
def test_register_failure_reasons(sim, printers, over, reason):
    p = printers(sim).connect()
    p.emit("register", register_payload(**over))
    assert p.expect("registerResponse") == {"status": "FAILED", "reason": reason}
    assert sim.violations == []


def test_register_missing_mfg_and_bad_types_are_violations(sim, printers):
    p = printers(sim).connect()
    d = register_payload()
    del d["mfg"]
    p.emit("register", d)
    assert p.expect("registerResponse") == {"status": "FAILED", "reason": "MFG_MISSING"}
    assert any("missing field 'mfg'" in v for v in sim.violations)
    sim.reset_records()
    p.emit("register", register_payload(pin=1234, myInfo={"MAC": "b8-27-eb-12-34-56"}))
    assert p.expect("registerResponse")["status"] == "SUCCESS"  # accepted, but flagged
    assert any("register.pin must be a string" in v for v in sim.violations)
    assert any("register.myInfo.MAC" in v for v in sim.violations)


def test_register_forbidden_for_mac_of_other_account(sim, printers):
    sim.add_account("other@example.com", "4321")
    p = printers(sim).connect()
    p.emit("register", register_payload())
    assert p.expect("registerResponse")["status"] == "SUCCESS"
    p.emit("register", register_payload(email="other@example.com", pin="4321"))
    assert p.expect("registerResponse") == {"status": "FAILED", "reason": "FORBIDDEN"}


def test_register_scripted_replies(sim, printers):
    sim.set_fault("register_reply", "SUCCESS")
    sim.set_fault("register_reply", {"status": "SUCCESS"})
    sim.set_fault(
        "register_reply", lambda r: {"status": r["status"], "serialNumber": "X"}
    )
    p = printers(sim).connect()
    p.emit("register", register_payload())
    assert p.expect("registerResponse") == "SUCCESS"
    p.emit("register", register_payload())
    assert p.expect("registerResponse") == {"status": "SUCCESS"}
    p.emit("register", register_payload())
    assert p.expect("registerResponse") == {"status": "SUCCESS", "serialNumber": "X"}
    p.emit("register", register_payload())  # queue empty: the real thing again
    assert p.expect("registerResponse")["reason"] == "SUCCESS"


# --- hello ---------------------------------------------------------------------


def test_hello_success_after_registration_reconnect(sim, printers):
    p = printers(sim).connect()
    p.emit("register", register_payload())
    serial = p.expect("registerResponse")["serialNumber"]
    p.close()
    q = printers(sim).connect()
    assert q.hello(serial) == {"status": "SUCCESS"}
    assert sim.wait_for("authenticated", serial=serial, timeout=5)["serial"] == serial
    assert sim.live_sessions(serial) == 1
    assert sim.connects(serial) == 1
    assert sim.violations == []


def test_hello_on_the_registration_connection_is_a_violation(sim, printers):
    p = printers(sim).connect()
    p.emit("register", register_payload())
    serial = p.expect("registerResponse")["serialNumber"]
    assert p.hello(serial) == {"status": "SUCCESS"}
    assert any("registration connection" in v for v in sim.violations)


def test_hello_signed_over_another_connections_challenge_fails(sim, printers):
    serial = provision(sim)
    a = printers(sim).connect()
    b = printers(sim).connect()
    b.emit("hello", hello_payload(serial, a.challenge))
    assert b.expect("helloResponse")["status"] == "FAILED"
    assert sim.live_sessions(serial) == 0
    assert any("challenge of another connection" in v for v in sim.violations)


def test_hello_wrong_key_unknown_serial_and_deleted(sim, printers):
    serial = provision(sim)
    p = printers(sim).connect()
    reply = p.hello(serial, OTHER_KEY)
    assert reply["status"] == "FAILED" and reply["message"]
    q = printers(sim).connect()
    assert q.hello("KL999999") == {"status": "FAILED", "message": "unknown printer"}
    sim.delete_printer(serial)
    r = printers(sim).connect()
    assert r.hello(serial)["status"] == "DELETED"
    assert sim.live_sessions() == 0
    assert sim.violations == []


def test_hello_field_checks(sim, printers):
    serial = provision(sim)
    p = printers(sim).connect()
    reply = p.hello(
        serial, MAC=None, camOff=True, transformImg=9, protocol=2, extra="x"
    )
    assert reply == {"status": "SUCCESS"}  # signature is what authenticates
    text = "\n".join(sim.violations)
    for needle in (
        "missing field 'MAC'",
        "hello.camOff",
        "hello.transformImg",
        "hello.protocol",
        "unexpected field 'extra'",
    ):
        assert needle in text


def test_hello_bad_base64_is_a_violation(sim, printers):
    serial = provision(sim)
    p = printers(sim).connect()
    sig = sign(KEY, p.challenge).replace("+", "-").replace("/", "_").rstrip("=")
    assert p.hello(serial, signature=sig)["status"] == "FAILED"
    assert any("base64" in v for v in sim.violations)


def test_hello_reply_overrides(sim, printers):
    serial = provision(sim)
    sim.set_fault("hello_reply", "FAILED")
    reply = printers(sim).connect().hello(serial)
    assert reply["status"] == "FAILED" and reply["message"]
    sim.set_fault("hello_reply", "DELETED")
    assert printers(sim).connect().hello(serial)["status"] == "DELETED"
    assert sim.live_sessions() == 0
    sim.set_fault("hello_reply", None)
    assert printers(sim).connect().hello(serial) == {"status": "SUCCESS"}


def test_no_hello_response_and_no_welcome(sim, printers):
    serial = provision(sim)
    sim.no_hello_response = True
    p = printers(sim).connect()
    p.emit("hello", hello_payload(serial, p.challenge))
    p.emit("register", register_payload(mfg="zz"))  # answered in order after hello
    event, _ = p.next_event()
    assert event == "registerResponse"
    assert sim.live_sessions() == 0
    sim.no_hello_response = False
    sim.no_welcome = True
    q = printers(sim).connect(welcome=False)
    q.emit("register", register_payload(mfg="zz"))
    event, _ = q.next_event()
    assert event == "registerResponse"
    assert len(sim.sent("welcome")) == 1


# --- authenticated traffic -----------------------------------------------------


def test_status_before_hello_is_a_violation_and_not_recorded(sim, printers):
    serial = provision(sim)
    p = printers(sim).connect()
    p.emit("status", {"serialNumber": serial, "status": 0})
    ev = sim.wait_event("status", ok=False, timeout=5)
    assert ev.data["status"] == 0
    assert sim.received("status") == []
    assert any("status before a successful hello" in v for v in sim.violations)


def test_status_is_checked_strictly(sim, printers):
    serial = provision(sim)
    p = online(sim, printers, serial)
    good = {
        "serialNumber": serial,
        "status": 3,
        "jobId": "job-1",
        "progress": "Job Printing",
        "progressDetail": "Printing: 42.0%",
        "estimatedTime": 5400,
        "printSeconds": 2290,
        "startTime": "2026-07-09T14:02:11Z",
        "filamentUsed": 3120,
        "bytesRead": 1048576,
        "fileSize": 2455040,
        "tool0": 214.8,
        "targetTool0": 215,
        "bed": 59.9,
        "targetBed": 60.0,
    }
    p.emit("status", good)
    assert sim.wait_for("status", serial=serial, timeout=5) == good
    assert sim.violations == []

    bad = [
        ({"status": "3"}, "status.status must be an integer"),
        ({"status": 16}, "status.status must be in 0..15"),
        ({"estimatedTime": "120"}, "status.estimatedTime must be an integer"),
        ({"startTime": "2026-07-09T14:02:11"}, "status.startTime"),
        ({"tool0": "200"}, "status.tool0 must be a number"),
        ({"jobId": 7}, "status.jobId must be a string"),
        ({"serialNumber": "KL000000"}, "session serial"),
        ({"stlFile": "x"}, "unexpected field 'stlFile'"),
        ({"status": 10, "jobId": "0"}, "code 10 is a print but jobId is '0'"),
        ({"status": 9, "jobId": "0"}, "code 9 is a print"),
        ({"status": 15, "jobId": "job-1"}, "code 15 is idle"),
    ]
    for change, needle in bad:
        sim.reset_records()
        p.emit("status", {**good, **change})
        sim.wait_for("status", timeout=5)
        assert any(needle in v for v in sim.violations), (change, sim.violations)


def test_job_set_version_capabilities_custom_commands(sim, printers):
    serial = provision(sim)
    p = online(sim, printers, serial)
    p.emit(
        "job",
        {
            "serialNumber": serial,
            "jobId": "j1",
            "state": "completed",
            "printSeconds": 10,
            "filamentUsed": 5,
        },
    )
    p.emit("setVersion", {"serialNumber": serial, "runningVersion": "0.1.0"})
    p.emit(
        "customCommandList",
        {
            "serialNumber": serial,
            "commandList": [
                {"label": "Reboot", "command": "core/reboot", "confirmText": "Sure?"}
            ],
        },
    )
    p.emit("capabilities", {"serialNumber": serial})
    assert p.expect("capabilitiesResponse") == {"capabilities": []}
    assert sim.received("job")[0]["state"] == "completed"
    assert sim.received("setVersion") and sim.received("customCommandList")
    assert sim.violations == []

    p.emit("job", {"serialNumber": serial, "jobId": "j2", "state": "cancelled"})
    p.emit("job", {"serialNumber": serial, "jobId": "j1", "state": "canceled"})
    sim.wait_until(lambda: len(sim.received("job")) == 3, 5)
    text = "\n".join(sim.violations)
    assert "canceled" in text and "second terminal report" in text


def test_send_next_print_gets_the_next_queued_job(sim, printers):
    serial = provision(sim)
    p = online(sim, printers, serial)
    url = sim.add_file("next-1.gcode", b"G28\n")
    sim.queue_print(serial, "next-1", "Second", gcode_url=url)
    p.emit("sendNextPrint", {"serialNumber": serial})
    assert p.expect("print") == {"serialNumber": serial, "jobId": "next-1",
                                 "jobName": "Second", "gcodeFile": url}
    # an empty queue: nothing comes back, and nothing is wrong
    p.emit("sendNextPrint", {"serialNumber": serial})
    sim.wait_until(lambda: len(sim.received("sendNextPrint")) == 2, 5)
    assert sim.violations == []
    p.emit("sendNextPrint", {"serialNumber": serial, "jobId": "x"})
    sim.wait_until(lambda: sim.violations, 5)
    assert "unexpected field 'jobId'" in sim.violations[0]


def test_printer_makes_by_machine_type(sim):
    url = sim.url + "/api/v1/printer_makes"
    makes = requests.get(url, params={"filter": "delta"}, timeout=5).json()
    assert makes == {"printerMakes": ["Delta", "SeeMeCNC Rostock Max V3"]}
    assert "Ender 3 V2" in requests.get(
        url, params={"filter": "cartesian"}, timeout=5).json()["printerMakes"]
    assert requests.get(url, params={"filter": "x"}, timeout=5).json() == {
        "printerMakes": []}
    assert sim.file_requests("printer_makes") == 3


def test_unknown_event_and_extra_arguments_are_violations(sim, printers):
    p = printers(sim).connect()
    p.emit("makeKeyPair", {"type": "RSA", "bits": 2048})
    p.emit("register", (register_payload(), "extra"))
    p.expect("registerResponse")
    text = "\n".join(sim.violations)
    assert "unknown event 'makeKeyPair'" in text
    assert "expected exactly one argument, got 2" in text


def test_unregister_deletes_the_printer(sim, printers):
    serial = provision(sim)
    p = online(sim, printers, serial)
    p.emit("unregister", {"serialNumber": serial})
    assert p.expect("unregisterResponse") == {"status": "SUCCESS"}
    assert sim.printer(serial).deleted
    assert sim.live_sessions(serial) == 0
    assert printers(sim).connect().hello(serial)["status"] == "DELETED"
    assert sim.violations == []


# --- getUrl and uploads ----------------------------------------------------------


def get_url(sim, p, serial, url_type="idle", **extra):
    p.emit(
        "getUrl", {"serialNumber": serial, "method": "post", "type": url_type, **extra}
    )
    return p.expect("getUrlResponse")


def post_form(url, fields, data=JPEG, ctype="image/jpeg", name="file"):
    files = {name: ("image.jpg", data, ctype)} if name else None
    return requests.post(url, data=list(fields.items()), files=files, timeout=5)


def test_get_url_response_and_upload(sim, printers):
    serial = provision(sim)
    p = online(sim, printers, serial)
    r = get_url(sim, p, serial)
    assert (
        r["status"] == "SUCCESS" and r["serialNumber"] == serial and r["type"] == "idle"
    )
    assert r["method"] == "post" and r["contentType"] == "image/jpeg"
    assert r["url"] == f"{sim.url}/upload"
    assert isinstance(r["expires"], int) and isinstance(r["maxSize"], int)
    assert list(r["fields"]) == [
        "bucket",
        "key",
        "acl",
        "X-Amz-Algorithm",
        "X-Amz-Credential",
        "X-Amz-Date",
        "Policy",
        "X-Amz-Signature",
    ]
    r2 = get_url(sim, p, serial, "printing", jobId="job-9")
    assert r2["fields"]["key"] != r["fields"]["key"]
    assert r2["fields"]["X-Amz-Signature"] != r["fields"]["X-Amz-Signature"]

    t0 = sim.now()
    resp = post_form(r2["url"], r2["fields"])
    assert resp.status_code == 204
    up = sim.wait_upload(timeout=5, since=t0)
    assert up["data"] == JPEG and up["content_type"] == "image/jpeg"
    assert (
        up["serial"] == serial and up["type"] == "printing" and up["jobId"] == "job-9"
    )
    assert up["fields"] == r2["fields"]
    assert sim.violations == []


def test_upload_rejections(sim, printers):
    serial = provision(sim)
    p = online(sim, printers, serial)
    form = get_url(sim, p, serial)
    fields = form["fields"]

    missing = {k: v for k, v in fields.items() if k != "Policy"}
    assert post_form(form["url"], missing).status_code == 403
    altered = {**fields, "key": "other.jpg"}
    assert post_form(form["url"], altered).status_code == 403
    assert post_form(form["url"], {**fields, "extra": "1"}).status_code == 403
    assert post_form(form["url"], fields, name=None).status_code == 400
    assert post_form(form["url"], fields, ctype="image/png").status_code == 403
    forged = {**fields, "X-Amz-Signature": "0" * 64}
    assert post_form(form["url"], forged).status_code == 403
    shuffled = dict(reversed(list(fields.items())))
    assert post_form(form["url"], shuffled).status_code == 204  # S3 accepts it...
    assert any("not in the issued order" in v for v in sim.violations)  # ...we flag it

    sim.max_size = 100
    small = get_url(sim, p, serial)
    resp = post_form(small["url"], small["fields"])
    assert resp.status_code == 400 and b"EntityTooLarge" in resp.content

    sim.url_expires = 0
    expired = get_url(sim, p, serial)
    assert expired["expires"] == 0
    resp = post_form(expired["url"], expired["fields"])
    assert resp.status_code == 403 and b"expired" in resp.content

    assert len(sim.uploads) == 1
    statuses = [a["status"] for a in sim.upload_attempts]
    assert statuses == [403, 403, 403, 400, 403, 403, 204, 400, 403]
    assert len(sim.violations) == 9


def test_upload_of_a_broken_jpeg_is_accepted_but_flagged(sim, printers):
    serial = provision(sim)
    p = online(sim, printers, serial)
    form = get_url(sim, p, serial)
    assert post_form(form["url"], form["fields"], data=JPEG[:100]).status_code == 204
    assert any("not a complete JPEG" in v for v in sim.violations)


# --- pushing commands ------------------------------------------------------------


def test_push_reaches_the_authenticated_printer(sim, printers):
    serial = provision(sim)
    p = online(sim, printers, serial)
    bystander = printers(sim).connect()  # not authenticated: gets nothing
    url = sim.add_file("job.gcode", b"G28\n")
    assert sim.push_print(serial, "job-1", job_name="Benchy", gcode_url=url) == 1
    assert p.expect("print") == {
        "serialNumber": serial,
        "jobId": "job-1",
        "jobName": "Benchy",
        "gcodeFile": url,
    }
    sim.pause(serial, type="filament")
    assert p.expect("pause") == {"serialNumber": serial, "type": "filament"}
    sim.resume(serial)
    assert p.expect("resume") == {"serialNumber": serial}
    sim.temperature(serial, tool0=200, bed=60)
    assert p.expect("temperature") == {"serialNumber": serial, "tool0": 200, "bed": 60}
    sim.command(serial, "M105", payload_serial="KL999999")
    assert p.expect("command") == {"serialNumber": "KL999999", "command": "M105"}
    sim.cancel(serial, payload_serial=None)
    assert p.expect("cancel") == {}
    assert sim.push("print", [], serial) == 1  # malformed on purpose
    assert p.expect("print") == []
    assert sim.push("pause", {"serialNumber": "X"}, "KL999999") == 0
    assert sim.sent("pause", serial=serial)[0]["type"] == "filament"
    assert bystander.inbox.empty()
    assert sim.violations == []


def test_delete_pushes_and_deletes(sim, printers):
    serial = provision(sim)
    p = online(sim, printers, serial)
    assert sim.delete(serial) == 1
    assert p.expect("delete") == {"serialNumber": serial}
    p.emit("status", {"serialNumber": serial, "status": 0})  # within the grace period
    sim.wait_event("status", ok=False, timeout=5)
    assert sim.violations == []
    assert printers(sim).connect().hello(serial)["status"] == "DELETED"


# --- links and faults ------------------------------------------------------------


@pytest.mark.parametrize("how", ["reset", "close", "disconnect"])
def test_drop_all_disconnects_everyone(sim, printers, how):
    a = online(sim, printers, provision(sim))
    b = online(sim, printers, provision(sim, mac="B8:27:EB:00:00:02"))
    assert sim.live_sessions() == 2
    assert sim.drop_all(how) == 2
    a.expect("disconnect")
    b.expect("disconnect")
    sim.wait_until(lambda: sim.live_sessions() == 0 and sim.connected() == 0, 5)
    assert sim.disconnects() == 2


def test_live_sessions_counts_per_serial(sim, printers):
    serial = provision(sim)
    other = provision(sim, mac="B8:27:EB:00:00:03")
    a = online(sim, printers, serial)
    online(sim, printers, serial)
    online(sim, printers, other, MAC="B8:27:EB:00:00:03")
    assert sim.live_sessions(serial) == 2
    assert sim.live_sessions(other) == 1
    assert sim.live_sessions() == 3
    a.close()
    sim.wait_until(lambda: sim.live_sessions(serial) == 1, 5)
    assert sim.disconnects(serial) == 1
    assert sim.drop(other) == 1
    sim.wait_until(lambda: sim.live_sessions(other) == 0, 5)


@pytest.mark.parametrize("mode", ["503", "reset", "closed", "sio"])
def test_refuse_connections(sim, printers, mode):
    t0 = sim.now()
    sim.set_fault("refuse_connections", mode)
    with pytest.raises(socketio.exceptions.ConnectionError):
        printers(sim).connect(welcome=False)
    if mode != "closed":
        assert sim.connection_attempts(since=t0, outcome=f"refused_{mode}")
        assert sim.wait_for("refused", timeout=5)["how"] == mode
    assert sim.connects() == 0
    sim.set_fault("refuse_connections", False)
    printers(sim).connect()
    assert sim.connects() == 1
    assert sim.violations == []


def test_black_hole_http_handshake_never_answers(sim, printers):
    sim.black_hole = "http"
    t0 = time.monotonic()
    with pytest.raises(socketio.exceptions.ConnectionError):
        printers(sim).connect(welcome=False)  # request_timeout=2
    assert time.monotonic() - t0 >= 1.5
    assert sim.connection_attempts(outcome="black_hole_http")


def test_black_hole_socket_connects_then_goes_silent(fast_sim, printers):
    sim = fast_sim
    sim.black_hole = True
    p = printers(sim).connect(welcome=False)
    t0 = time.monotonic()
    p.emit("register", register_payload())
    event, _ = p.next_event(timeout=10)  # no welcome, no reply, no pings...
    assert event == "disconnect"  # ...so the client's ping timeout fires
    assert time.monotonic() - t0 >= 1.5
    assert "Server has stopped communicating, aborting" in p.warnings
    assert sim.sent("welcome") == [] and sim.received("register") == []


@pytest.mark.parametrize("transports", [("websocket",), ("polling", "websocket")])
def test_freeze_is_only_detected_by_the_printers_ping_timeout(
    fast_sim, printers, transports
):
    sim = fast_sim
    serial = provision(sim)
    p = printers(sim, transports).connect()
    assert p.hello(serial) == {"status": "SUCCESS"}
    assert p.sio.eio.current_transport == "websocket"  # upgraded, if it started polling
    other = online(sim, printers, provision(sim, mac="B8:27:EB:00:00:04"))
    t0 = time.monotonic()
    assert sim.freeze(serial) == 1
    sim.push("pause", {"serialNumber": serial}, serial)  # never delivered
    event, _ = p.next_event(timeout=10)
    assert event == "disconnect"
    assert "Server has stopped communicating, aborting" in p.warnings  # no FIN/RST
    assert time.monotonic() - t0 >= 1.5
    assert other.sio.connected and other.inbox.empty()
    sim.wait_for("disconnect", serial=serial, timeout=10)  # server times out too
    assert sim.live_sessions(serial) == 0


def test_handler_exception_is_recorded_and_server_survives(sim, printers, monkeypatch):
    serial = provision(sim)
    p = online(sim, printers, serial)

    async def boom(session, data):
        raise RuntimeError("boom")

    monkeypatch.setattr(sim, "_handle_status", boom)
    p.emit("status", {"serialNumber": serial, "status": 0})
    sim.wait_until(lambda: sim.violations, 5)
    assert "internal error in status" in sim.violations[0]
    assert printers(sim).connect().hello(serial) == {"status": "SUCCESS"}


def test_fleet_of_printers(sim, printers):
    n = 24
    macs = [f"B8:27:EB:00:01:{i:02X}" for i in range(n)]
    serials = [provision(sim, mac=mac) for mac in macs]
    with ThreadPoolExecutor(8) as pool:
        replies = list(
            pool.map(lambda s, m: online(sim, printers, s, MAC=m), serials, macs)
        )
    assert len(replies) == n
    assert sim.live_sessions() == n
    assert all(sim.live_sessions(s) == 1 for s in serials)
    assert sim.violations == []


# --- HTTP files ------------------------------------------------------------------


def test_file_modes(sim):
    body = bytes(range(256)) * 8  # 2 KiB
    get = lambda url, **kw: requests.get(url, timeout=5, **kw)  # noqa: E731

    url = sim.add_file("ok.gcode", body, content_type="text/x-gcode")
    r = get(url)
    assert r.status_code == 200 and r.content == body
    assert r.headers["Content-Type"] == "text/x-gcode"
    get(url)
    assert sim.file_requests("ok.gcode") == 2

    assert get(sim.add_file("gone.gcode", body, "404")).status_code == 404
    assert get(sim.add_file("err.gcode", body, "500")).status_code == 500
    assert get(sim.file_url("never-added.gcode")).status_code == 404

    r = get(sim.add_file("page.gcode", body, "html"))
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    assert b"<html>" in r.content

    r = get(sim.add_file("chain.gcode", body, "redirect", hops=3))
    assert r.status_code == 200 and r.content == body and len(r.history) == 3
    r = get(sim.add_file("jump.gcode", mode="redirect", target="ok.gcode"))
    assert r.content == body

    r = get(sim.add_file("chunked.gcode", body, "no_length"))
    assert r.content == body and "Content-Length" not in r.headers

    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        get(sim.add_file("long.gcode", body, "lying_length", length_delta=1000))
    r = get(sim.add_file("short.gcode", body, "lying_length", length_delta=-1000))
    assert r.content == body[:-1000]
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        get(sim.add_file("trunc.gcode", body, "truncate"))
    with pytest.raises(requests.exceptions.ConnectionError):
        get(sim.add_file("rst.gcode", body, "reset"))
    with pytest.raises(requests.exceptions.RequestException):
        get(sim.add_file("rsthalf.gcode", body, "reset_half"))

    t0 = time.monotonic()
    r = get(sim.add_file("slow.gcode", body[:100], "slow", rate=400))
    assert r.content == body[:100] and time.monotonic() - t0 >= 0.2

    r = requests.get(
        sim.add_file("stall.gcode", body, "stall"), stream=True, timeout=0.5
    )
    assert r.headers["Content-Length"] == str(len(body))
    assert r.raw.read(len(body) // 2) == body[: len(body) // 2]
    with pytest.raises(Exception, match="[Tt]imed? ?out"):
        r.raw.read(1)
    r.close()


# --- control API, CLI and life cycle --------------------------------------------


def test_http_control_api(sim, printers):
    serial = provision(sim)
    p = online(sim, printers, serial)
    api = f"{sim.url}/_sim"
    url = requests.post(
        f"{api}/files", json={"name": "a.gcode", "content": "G28\n"}, timeout=5
    ).json()["url"]
    assert requests.get(url, timeout=5).content == b"G28\n"
    data = {"serialNumber": serial, "jobId": "j1", "jobName": "a", "gcodeFile": url}
    sent = requests.post(
        f"{api}/push",
        json={"event": "print", "data": data, "serial": serial},
        timeout=5,
    ).json()
    assert sent == {"sent": 1}
    assert p.expect("print") == data
    events = requests.get(f"{api}/events", params={"name": "print"}, timeout=5).json()
    assert [e["data"] for e in events["events"]] == [data]
    assert requests.post(
        f"{api}/fault", json={"name": "no_welcome", "value": True}, timeout=5
    ).json() == {"ok": True}
    assert sim.no_welcome is True
    bad = requests.post(f"{api}/fault", json={"name": "nonsense"}, timeout=5)
    assert bad.status_code == 400
    state = requests.get(f"{api}/state", timeout=5).json()
    assert state["sessions"][0]["serial"] == serial


def test_cli_prints_url_and_events():
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.testbed.polarsim", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("polarsim listening on http://127.0.0.1:")
        url = first.split()[-1]
        sio = socketio.Client(reconnection=False, handle_sigint=False)
        sio.connect(url, transports=["websocket"], wait_timeout=5)
        lines = [
            proc.stdout.readline() for _ in range(3)
        ]  # control API, connect, welcome
        sio.disconnect()
        assert any("welcome" in line for line in lines), lines
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "polarsim stopped" in out


def test_stop_leaves_no_threads(printers):
    before = set(threading.enumerate())
    s = PolarSim().start()
    p = printers(s).connect()
    p.close()
    s.stop()
    p.sio.shutdown()
    leftover = {t for t in set(threading.enumerate()) - before if t.is_alive()}
    assert leftover == set()
