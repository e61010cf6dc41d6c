"""PolarSim: a strict local Polar Cloud (docs/testing.md) for tests and demos.

A real python-socketio ``AsyncServer`` (Engine.IO v4 / Socket.IO v5, path
``/socket.io/``, websocket and polling) plus an aiohttp HTTP side on the same
127.0.0.1 port, run on a private asyncio loop in a background thread.  All
public methods are synchronous and thread-safe; tests call them from their
own thread.  Protocol violations are recorded in :attr:`PolarSim.violations`
instead of raising.

Dead-link emulation (:meth:`PolarSim.freeze`): the chosen technique is a
per-connection *half-open TCP* freeze.  The connection's socket is dup()ed so
the kernel keeps the TCP connection open, the asyncio transport stops reading
and its writes are discarded, and the Engine.IO socket drops every packet
(no PINGs, no events) and ignores everything it receives.  The printer sees a
silent but open TCP connection - exactly what ``iptables -j DROP`` produces -
and only its ping timeout (``pingInterval + pingTimeout``) or an app-level
watchdog can notice.  The server side times the socket out on its own (a
``disconnect`` is recorded then) but no FIN or RST ever reaches the printer
until the simulator stops or :meth:`PolarSim.drop` kills the link.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import os
import re
import secrets
import socket
import struct
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Callable

import socketio
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from engineio import packet as eio_packet

from ..servers import BackgroundServer, LoopThread
from . import checks
from .httpside import HttpSide, UploadForm, reset_transport
from .records import CONN, IN, OUT, Recorder, SimEvent

SIO_PATH = "/socket.io/"
DEFAULT_EMAIL = "test@example.com"
DEFAULT_PIN = "1234"
# Events from a connection whose printer was just deleted/unregistered are
# ignored without a violation for this long (the printer may not know yet).
REVOKE_GRACE = 2.0

POST_AUTH_EVENTS = (
    "status",
    "job",
    "setVersion",
    "getUrl",
    "capabilities",
    "customCommandList",
    "sendNextPrint",
    "unregister",
)
INBOUND_EVENTS = ("register", "hello", *POST_AUTH_EVENTS)

REFUSE_MODES = (False, "503", "sio", "reset", "closed")
BLACK_HOLE_MODES = (False, "socket", "http")
FAULT_NAMES = (
    "no_welcome",  # bool: never send welcome
    "welcome_payload",  # None | value sent instead | callable(challenge) -> value
    "refuse_connections",  # False | True/"503" | "sio" | "reset" | "closed"
    "black_hole",  # False | True/"socket" | "http"
    "no_hello_response",  # bool: swallow hello
    "hello_reply",  # None | "FAILED" | "DELETED" | dict | other (sent verbatim)
    "no_register_response",  # bool: swallow register
    "register_reply",  # queue one scripted reply (value, or callable(real_reply))
    "no_geturl_response",  # bool: swallow getUrl
    "geturl_reply",  # queue one scripted reply (value, or callable(real_reply))
    "upload_fail",  # None | HTTP status for every upload
)
SETTING_NAMES = (
    "url_expires",
    "max_size",
    "timelapse_max_size",
    "capabilities",
    "hello_required",
)

_SAME: Any = object()  # "use the target serial" marker for payload_serial


@dataclass
class Printer:
    """A printer record on the cloud side."""

    serial: str
    mfg: str
    email: str | None
    mac: str | None
    public_key: rsa.RSAPublicKey
    public_key_pem: str
    mfg_sn: str | None = None
    deleted: bool = False


@dataclass
class Session:
    """One Socket.IO connection."""

    sid: str
    eio_sid: str
    t_connect: float
    transport: str
    challenge: str | None = None
    serial: str | None = None
    authenticated: bool = False
    registered_here: bool = False
    revoked_at: float | None = None
    frozen: bool = False
    black_hole: bool = False


def load_public_key(pem: Any) -> rsa.RSAPublicKey | None:
    """Parse an RSA public key in SPKI or PKCS#1 PEM; None if unusable."""
    if not isinstance(pem, str) or "-----BEGIN" not in pem:
        return None
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError):
        return None
    return key if isinstance(key, rsa.RSAPublicKey) else None


def _verify(key: rsa.RSAPublicKey, signature: bytes, challenge: str) -> bool:
    try:
        key.verify(
            signature, challenge.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256()
        )
    except InvalidSignature:
        return False
    return True


def describe(ev: SimEvent) -> str:
    """One log line for an event, e.g. ``status KL000001 status=3 ...``."""
    arrow = {IN: "<-", OUT: "->", CONN: "**"}.get(ev.direction, "  ")
    who = ev.serial or (ev.sid[:8] if ev.sid else "-")
    d = ev.data
    if ev.name == "status" and isinstance(d, dict):
        pct = "-"
        read, size = d.get("bytesRead"), d.get("fileSize")
        if isinstance(read, int) and isinstance(size, int) and size > 0:
            pct = f"{100 * read // size}%"
        else:
            m = re.search(r"(\d+(?:\.\d+)?)%", str(d.get("progressDetail", "")))
            pct = f"{m.group(1)}%" if m else pct
        text = f"status={d.get('status')!r} jobId={d.get('jobId', '-')} progress={pct}"
        for k in ("tool0", "bed"):
            if k in d:
                text += f" {k}={d[k]}"
    elif isinstance(d, dict):
        hidden = {"pin", "publicKey", "signature", "fields", "Policy"}
        text = " ".join(f"{k}={'<...>' if k in hidden else v!r}" for k, v in d.items())
    else:
        text = repr(d)
    if len(text) > 200:
        text = text[:197] + "..."
    flag = "" if ev.ok else " [REJECTED]"
    return f"{arrow} {ev.name} {who} {text}{flag}"


class PolarSim(BackgroundServer):
    """The simulator.  ``sim = PolarSim(); sim.start(); ...; sim.stop()``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ping_interval: int = 25,
        ping_timeout: int = 20,
        url_expires: int = 600,
        max_size: int = 1_000_000,
        timelapse_max_size: int = 20_000_000,
        capabilities: list[str] | None = None,
        on_event: Callable[[SimEvent], None] | None = None,
        on_violation: Callable[[str], None] | None = None,
    ) -> None:
        if int(ping_interval) != ping_interval or ping_interval < 1:
            raise ValueError("ping_interval must be a whole number of seconds >= 1")
        if int(ping_timeout) != ping_timeout or ping_timeout < 1:
            raise ValueError("ping_timeout must be a whole number of seconds >= 1")
        self.host = host
        self._want_port = port
        self.port: int | None = None
        self.url: str | None = None
        # Where printers find the job files and the upload endpoint, when
        # not at url: e.g. behind a TLS terminator, under a name only a
        # proxy resolves
        self.public_url: str | None = None
        self.ping_interval = int(ping_interval)
        self.ping_timeout = int(ping_timeout)
        self.rec = Recorder(on_event, on_violation)
        self.http = HttpSide(self.rec, lambda: self.public_url or self.url or "",
                             lambda: self._stopping)

        # settings
        self.url_expires = url_expires
        self.max_size = max_size
        self.timelapse_max_size = timelapse_max_size
        self.capabilities: list[str] = list(capabilities or [])
        self.hello_required: tuple[str, ...] = checks.HELLO_REQUIRED

        # cloud state (guarded by self.rec.lock)
        self.accounts: dict[str, str] = {DEFAULT_EMAIL: DEFAULT_PIN}
        self.printers: dict[str, Printer] = {}
        self.sessions: dict[str, Session] = {}
        self._next_serial = 1
        self._recent_challenges: collections.deque[str] = collections.deque(maxlen=256)
        self._job_reports: set[tuple[str, str]] = set()
        # the cloud's print queue per serial, for sendNextPrint
        self.queued_prints: dict[str, collections.deque[dict[str, Any]]] = {}

        # faults
        self.no_welcome = False
        self.welcome_payload: Any = None
        self._refuse: Any = False
        self._black_hole: Any = False
        self.no_hello_response = False
        self.hello_reply: Any = None
        self.no_register_response = False
        self.register_replies: collections.deque[Any] = collections.deque()
        self.no_geturl_response = False
        self.geturl_replies: collections.deque[Any] = collections.deque()

        # loop-thread state
        self._loop_thread = LoopThread("polarsim")
        self._stopping: asyncio.Event = None  # type: ignore[assignment]
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None
        self.sio: socketio.AsyncServer = None  # type: ignore[assignment]
        self._tasks: set[asyncio.Task[Any]] = set()
        # live HTTP requests (websocket or polling) per Engine.IO sid, by id()
        self._eio_requests: dict[str, dict[int, web.Request]] = {}
        self._request_eio: dict[int, str] = {}  # id(request) -> Engine.IO sid
        self._held: dict[str, list[socket.socket]] = {}
        self._frozen_eio: set[str] = set()

    # ======================================================================
    # life cycle
    # ======================================================================

    def start(self) -> PolarSim:
        self._loop_thread.start(self._startup)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._loop_thread.stop(self._shutdown, timeout)

    async def _startup(self) -> None:
        self._stopping = asyncio.Event()
        self.sio = socketio.AsyncServer(
            async_mode="aiohttp",
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            cors_allowed_origins="*",
            logger=False,
            engineio_logger=False,
            transports=["polling", "websocket"],
        )
        app = web.Application(middlewares=[self._middleware])
        self.sio.attach(app, socketio_path="socket.io")
        self.http.add_routes(app)
        self._add_control_routes(app)
        self.sio.on("connect", self._on_connect)
        self.sio.on("disconnect", self._on_disconnect)
        for name in INBOUND_EVENTS:
            self.sio.on(name, self._inbound_handler(name))
        self.sio.on("*", self._on_any_event)
        self._runner = web.AppRunner(
            app, handle_signals=False, shutdown_timeout=1.0, access_log=None
        )
        await self._runner.setup()
        sock = self._bind(self._want_port)
        self.port = sock.getsockname()[1]
        url_host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        self.url = f"http://{url_host}:{self.port}"
        await self._listen(sock)

    def _bind(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, port))
        sock.listen(256)
        sock.setblocking(False)
        return sock

    async def _listen(self, sock: socket.socket) -> None:
        assert self._runner is not None
        self._site = web.SockSite(self._runner, sock, backlog=256)
        await self._site.start()

    async def _set_listening(self, on: bool) -> None:
        if on and self._site is None and self.port is not None:
            await self._listen(self._bind(self.port))
        elif not on and self._site is not None:
            await self._site.stop()  # closes the listening socket: ECONNREFUSED
            self._site = None

    async def _shutdown(self) -> None:
        self._stopping.set()
        for sock in list(self.sio.eio.sockets.values()):
            sock.queue.put_nowait(None)  # end pending long-polls and ws writers
        for eio_sid in list(self._eio_requests) + list(self._held):
            self._kill_eio(eio_sid, reset=False, fallback=False)
        try:
            await asyncio.wait_for(self.sio.shutdown(), 2)
        except Exception:
            pass
        if self._runner is not None:
            await self._runner.cleanup()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run a background coroutine; its exceptions become violations."""

        async def guarded() -> Any:
            try:
                return await coro
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._internal(getattr(coro, "__qualname__", "task"), e)

        task = asyncio.ensure_future(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _in_loop(self) -> bool:
        return self._loop_thread.in_loop()

    def _call(self, coro: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
        """Run a coroutine on the simulator loop from another thread."""
        return self._loop_thread.call(coro, timeout)

    # ======================================================================
    # engine.io level: connection attempts, refusal, freezing
    # ======================================================================

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        if not request.path.startswith(SIO_PATH):
            try:
                return await handler(request)
            except web.HTTPException:
                raise
            except Exception as e:
                self._internal(f"HTTP {request.method} {request.path}", e)
                return web.Response(status=500, text="polarsim internal error")
        sid = request.query.get("sid")
        if sid is None and request.method == "GET":
            refuse = self._refuse
            if refuse == "503":
                self._refused("503")
                return web.Response(status=503, text="Service Unavailable")
            if refuse == "sio":  # refused later, in the Socket.IO connect handler
                self.rec.attempt("refused_sio")
                return await handler(request)
            if refuse == "reset":
                self._refused("reset")
                reset_transport(request.transport)
                return web.Response()
            if self._black_hole == "http":
                self.rec.attempt("black_hole_http")
                self._freeze_transport("_http_black_hole", request.transport)
                await self._stopping.wait()
                return web.Response()
            self.rec.attempt("open")
        elif sid is not None:
            if sid in self._frozen_eio:
                self._freeze_transport(sid, request.transport)
                await self._stopping.wait()
                return web.Response()
            self._track(sid, request)
        try:
            return await handler(request)
        finally:
            eio = self._request_eio.pop(id(request), None)
            reqs = self._eio_requests.get(eio) if eio else None
            if reqs is not None:
                reqs.pop(id(request), None)
                if not reqs:
                    del self._eio_requests[eio]

    def _track(self, eio_sid: str, request: web.Request) -> None:
        self._request_eio[id(request)] = eio_sid
        self._eio_requests.setdefault(eio_sid, {})[id(request)] = request

    def _requests(self, eio_sid: str) -> list[web.Request]:
        return list(self._eio_requests.get(eio_sid, {}).values())

    def _refused(self, how: str) -> None:
        self.rec.attempt(f"refused_{how}")
        self.rec.record(None, None, CONN, "refused", {"how": how})

    def _freeze_transport(
        self, key: str, transport: asyncio.BaseTransport | None
    ) -> None:
        """Make one TCP connection half-open: open, silent, unread."""
        if transport is None or transport.is_closing():
            return
        if getattr(transport, "_polarsim_frozen", False):
            return
        raw = transport.get_extra_info("socket")
        if raw is None:
            return
        try:
            held = socket.socket(fileno=os.dup(raw.fileno()))
        except OSError:
            return
        self._held.setdefault(key, []).append(held)

        def discard(*_args: Any, **_kwargs: Any) -> None:
            return None

        for name in ("write", "writelines", "write_eof", "resume_reading"):
            setattr(transport, name, discard)
        transport.pause_reading()  # type: ignore[attr-defined]
        transport._polarsim_frozen = True  # type: ignore[attr-defined]

    def _silence_eio(self, eio_sid: str, keep_connect_ack: bool = False) -> None:
        """Engine.IO socket drops all outgoing packets and ignores input."""
        sock = self.sio.eio.sockets.get(eio_sid)
        if sock is None:
            return
        original_send = sock.send

        async def send(pkt: eio_packet.Packet) -> None:
            if (
                keep_connect_ack
                and pkt.packet_type == eio_packet.MESSAGE
                and isinstance(pkt.data, str)
                and pkt.data.startswith("0")  # Socket.IO CONNECT ack
            ):
                await original_send(pkt)
                self._spawn(self._freeze_after_flush(eio_sid, sock))

        async def receive(pkt: eio_packet.Packet) -> None:
            return None

        sock.send = send
        sock.receive = receive

    def _freeze_eio(self, eio_sid: str) -> None:
        self._frozen_eio.add(eio_sid)
        self._silence_eio(eio_sid)
        for request in self._requests(eio_sid):
            self._freeze_transport(eio_sid, request.transport)

    async def _freeze_after_flush(self, eio_sid: str, sock: Any) -> None:
        # The websocket writer pulls the ack from the queue and writes it in
        # the same loop step; a few yields are plenty.
        await sock.queue.join()
        for _ in range(3):
            await asyncio.sleep(0)
        self._freeze_eio(eio_sid)

    def _kill_eio(self, eio_sid: str, reset: bool, fallback: bool = True) -> bool:
        """Close (FIN) or reset (RST) every TCP connection of an Engine.IO socket."""
        killed = False
        held = self._held.pop(eio_sid, [])
        if reset:
            for h in held:
                try:
                    h.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                except OSError:
                    pass
        for request in self._requests(eio_sid):
            transport = request.transport
            if transport is not None and not transport.is_closing():
                if reset:
                    reset_transport(transport)
                else:
                    transport.close()
                killed = True
        for h in held:
            h.close()
            killed = True
        if not killed and fallback and eio_sid in self.sio.eio.sockets:
            self._spawn(self.sio.eio.disconnect(eio_sid))
            killed = True
        return killed

    # ======================================================================
    # socket.io handlers
    # ======================================================================

    async def _on_connect(
        self, sid: str, environ: dict[str, Any], auth: Any = None
    ) -> bool:
        try:
            if self._refuse == "sio":
                self.rec.record(None, None, CONN, "refused", {"how": "sio"})
                return False
            eio_sid = self.sio.manager.eio_sid_from_sid(sid, "/")
            request: web.Request | None = environ.get("aiohttp.request")
            transport = "polling"
            if request is not None and request.query.get("transport") == "websocket":
                transport = "websocket"
                if id(request) not in self._request_eio:
                    self._track(eio_sid, request)
            session = Session(sid, eio_sid, time.monotonic(), transport)
            with self.rec.lock:
                self.sessions[sid] = session
            self.rec.record(sid, None, CONN, "connect", {"transport": transport})
            if auth is not None:
                self._violation(session, f"connect: unexpected auth payload {auth!r}")
            if self._black_hole:
                session.black_hole = session.frozen = True
                if transport == "websocket":
                    self._silence_eio(eio_sid, keep_connect_ack=True)
                else:  # polling: freeze at once (the CONNECT ack is lost too)
                    self._freeze_eio(eio_sid)
                return True
            self._spawn(self._after_connect(session))
        except Exception as e:
            self._internal("connect", e)
        return True

    async def _after_connect(self, session: Session) -> None:
        # Runs after python-socketio has sent the CONNECT ack.
        for _ in range(100):
            if self.sio.manager.is_connected(session.sid, "/"):
                break
            await asyncio.sleep(0)
        else:
            if session.sid in self.sessions:
                self._internal("welcome", RuntimeError("connection never completed"))
            return
        if session.frozen or self.no_welcome or session.sid not in self.sessions:
            return
        challenge: str | None = secrets.token_hex(16)
        payload: Any = {"challenge": challenge}
        if self.welcome_payload is not None:
            payload = self.welcome_payload
            if callable(payload):
                payload = payload(challenge)
            challenge = None
            if isinstance(payload, dict) and isinstance(payload.get("challenge"), str):
                challenge = payload["challenge"]
        session.challenge = challenge
        if challenge:
            self._recent_challenges.append(challenge)
        await self._emit(session, "welcome", payload)

    async def _on_disconnect(self, sid: str, reason: Any = None) -> None:
        try:
            with self.rec.lock:
                session = self.sessions.pop(sid, None)
            serial = session.serial if session else None
            self.rec.record(sid, serial, CONN, "disconnect", {"reason": str(reason)})
            if session is not None and not session.frozen:
                # Like the Node server, answer a pending long-poll at once so
                # a polling client's disconnect() need not wait for a timeout.
                sock = self.sio.eio.sockets.get(session.eio_sid)
                if sock is not None and not sock.upgraded:
                    sock.queue.put_nowait(eio_packet.Packet(eio_packet.NOOP))
        except Exception as e:
            self._internal("disconnect", e)

    def _inbound_handler(self, name: str) -> Callable[..., Coroutine[Any, Any, None]]:
        async def handler(sid: str, *args: Any) -> None:
            await self._dispatch(name, sid, args)

        return handler

    async def _on_any_event(self, event: str, sid: str, *args: Any) -> None:
        await self._dispatch(event, sid, args)

    async def _dispatch(self, name: str, sid: str, args: tuple[Any, ...]) -> None:
        session = self.sessions.get(sid)
        if session is None or session.frozen:
            return
        data = args[0] if len(args) == 1 else (list(args) if args else None)
        known = name in INBOUND_EVENTS
        needs_auth = name in POST_AUTH_EVENTS
        serial = session.serial
        if (
            serial is None
            and isinstance(data, dict)
            and isinstance(data.get("serialNumber"), str)
        ):
            serial = data["serialNumber"]
        ok = known and (session.authenticated or not needs_auth)
        self.rec.record(sid, serial, IN, name, data, ok)
        if len(args) != 1:
            self._violation(
                session, f"{name}: expected exactly one argument, got {len(args)}"
            )
        if not known:
            self._violation(session, f"unknown event {name!r}")
            return
        if not ok:
            revoked = session.revoked_at
            if revoked is not None:
                if time.monotonic() - revoked > REVOKE_GRACE:
                    self._violation(session, f"{name} after the printer was deleted")
            else:
                self._violation(session, f"{name} before a successful hello")
            return
        try:
            await getattr(self, f"_handle_{name}")(session, data)
        except Exception as e:
            self._internal(name, e)

    async def _emit(
        self, session: Session, event: str, data: Any, serial: str | None = None
    ) -> None:
        self.rec.record(session.sid, serial or session.serial, OUT, event, data)
        await self.sio.emit(event, data, to=session.sid)

    def _violation(self, session: Session | None, message: str) -> None:
        who = (session.serial or session.sid[:8]) if session else None
        self.rec.violation(message, who)

    def _internal(self, where: str, exc: BaseException) -> None:
        self.rec.violation(f"simulator internal error in {where}: {exc!r}", "polarsim")

    # -- register / hello ----------------------------------------------------

    async def _handle_register(self, session: Session, data: Any) -> None:
        for problem in checks.check_register(data):
            self._violation(session, problem)
        if session.authenticated:
            self._violation(session, "register on an authenticated connection")
        if self.no_register_response:
            return
        scripted = self.register_replies.popleft() if self.register_replies else None
        if scripted is not None and not callable(scripted):
            await self._emit(session, "registerResponse", scripted)
            return
        with self.rec.lock:
            reply = self._register(data if isinstance(data, dict) else {})
        if reply.get("status") == "SUCCESS":
            session.registered_here = True
        serial = reply.get("serialNumber")
        if callable(scripted):
            reply = scripted(reply)
        await self._emit(session, "registerResponse", reply, serial)

    def _register(self, d: dict[str, Any]) -> dict[str, Any]:
        def failed(reason: str) -> dict[str, Any]:
            return {"status": "FAILED", "reason": reason}

        mfg = d.get("mfg")
        if not isinstance(mfg, str) or not mfg:
            return failed("MFG_MISSING")
        if mfg not in checks.MFG_CODES:
            return failed("MFG_UNKNOWN")
        email = d.get("email")
        email_key = email.strip().lower() if isinstance(email, str) else None
        pin = d.get("pin")
        account_pin = self.accounts.get(email_key) if email_key else None
        if account_pin is None or pin is None or str(pin) != account_pin:
            return failed("EMAIL_PIN_ERROR")
        pem = d.get("publicKey")
        key = load_public_key(pem)
        if key is None:
            return failed("INVALID_KEY")
        info = d.get("myInfo")
        mac = info.get("MAC") if isinstance(info, dict) else None
        mac = mac if isinstance(mac, str) and mac else None
        mfg_sn = d.get("mfgSn") if isinstance(d.get("mfgSn"), str) else None
        # The cloud recognises a device by its MAC: a register from a MAC it
        # knows gets that printer's serial back, with the new key (so two
        # printers sending one MAC are one printer, the last to register).
        existing = next(
            (
                p
                for p in self.printers.values()
                if mac and p.mac == mac and not p.deleted
            ),
            None,
        )
        if existing is not None and existing.email != email_key:
            return failed("FORBIDDEN")
        if existing is not None:
            existing.public_key, existing.public_key_pem = key, str(pem)
            existing.mfg_sn = mfg_sn or existing.mfg_sn
            serial = existing.serial
        else:
            serial = self._new_printer(
                mfg, email_key, mac, key, str(pem), mfg_sn
            ).serial
        return {"status": "SUCCESS", "reason": "SUCCESS", "serialNumber": serial}

    def _new_printer(
        self,
        mfg: str,
        email: str | None,
        mac: str | None,
        key: rsa.RSAPublicKey,
        pem: str,
        mfg_sn: str | None,
        serial: str | None = None,
    ) -> Printer:
        if serial is None:
            serial = f"{mfg.upper()}{self._next_serial:06d}"
            self._next_serial += 1
        printer = Printer(serial, mfg, email, mac, key, pem, mfg_sn)
        self.printers[serial] = printer
        return printer

    async def _handle_hello(self, session: Session, data: Any) -> None:
        for problem in checks.check_hello(data, tuple(self.hello_required)):
            self._violation(session, problem)
        if session.authenticated:
            self._violation(session, "second hello on an authenticated connection")
        if session.registered_here:
            self._violation(
                session,
                "hello on the registration connection (must reconnect first)",
            )
        if self.no_hello_response:
            return
        d = data if isinstance(data, dict) else {}
        serial = d.get("serialNumber")
        with self.rec.lock:
            printer = self.printers.get(serial) if isinstance(serial, str) else None
        success = False
        reply: Any
        if session.challenge is None:
            self._violation(
                session, "hello before welcome (no challenge on this connection)"
            )
            reply = {
                "status": "FAILED",
                "message": "no challenge issued on this connection",
            }
        elif printer is None:
            reply = {"status": "FAILED", "message": "unknown printer"}
        elif printer.deleted:
            reply = {"status": "DELETED", "message": "Printer has been deleted"}
        else:
            verdict = self._check_signature(
                printer, d.get("signature"), session.challenge
            )
            if verdict == "bad_format":
                self._violation(
                    session, "hello.signature is not standard padded base64"
                )
            elif verdict == "stale":
                self._violation(
                    session, "hello signed the challenge of another connection"
                )
            success = verdict == "ok"
            reply = (
                {"status": "SUCCESS"}
                if success
                else {"status": "FAILED", "message": "signature verification failed"}
            )
            sent_sn = d.get("mfgSn")
            if success and printer.mfg_sn and sent_sn and sent_sn != printer.mfg_sn:
                self._violation(
                    session,
                    f"hello.mfgSn {sent_sn!r} != registered {printer.mfg_sn!r}",
                )
            # The cloud knows a device by its MAC (see _register)
            sent_mac = d.get("MAC")
            if success and printer.mac and sent_mac and sent_mac != printer.mac:
                self._violation(
                    session, f"hello.MAC {sent_mac!r} != registered {printer.mac!r}"
                )
        if self.hello_reply is not None:
            reply = self._expand_reply(self.hello_reply)
            success = success and (
                reply == "SUCCESS"
                or (isinstance(reply, dict) and reply.get("status") == "SUCCESS")
            )
        if success:
            with self.rec.lock:
                session.authenticated, session.serial = True, serial
                session.revoked_at = None
            self.rec.record(
                session.sid, serial, CONN, "authenticated", {"serial": serial}
            )
        await self._emit(session, "helloResponse", reply)

    @staticmethod
    def _expand_reply(value: Any) -> Any:
        if value == "FAILED":
            return {"status": "FAILED", "message": "Simulated failure"}
        if value == "DELETED":
            return {"status": "DELETED", "message": "Printer has been deleted"}
        return value

    def _check_signature(self, printer: Printer, signature: Any, challenge: str) -> str:
        if not isinstance(signature, str):
            return "bad"
        try:
            raw = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            return "bad_format"
        if _verify(printer.public_key, raw, challenge):
            return "ok"
        for old in list(self._recent_challenges):
            if old != challenge and _verify(printer.public_key, raw, old):
                return "stale"
        return "bad"

    # -- authenticated events ------------------------------------------------

    def _check(
        self, session: Session, event: str, data: Any, problems: list[str]
    ) -> None:
        problems = problems + checks.check_serial_matches(event, data, session.serial)
        for problem in problems:
            self._violation(session, problem)

    async def _handle_status(self, session: Session, data: Any) -> None:
        self._check(session, "status", data, checks.check_status(data))

    async def _handle_job(self, session: Session, data: Any) -> None:
        self._check(session, "job", data, checks.check_job(data))
        if isinstance(data, dict) and isinstance(data.get("jobId"), str):
            key = (session.serial or "", data["jobId"])
            with self.rec.lock:
                duplicate = key in self._job_reports
                self._job_reports.add(key)
            if duplicate:
                self._violation(
                    session, f"job: second terminal report for jobId {key[1]!r}"
                )

    async def _handle_setVersion(self, session: Session, data: Any) -> None:  # noqa: N802
        self._check(session, "setVersion", data, checks.check_set_version(data))

    async def _handle_capabilities(self, session: Session, data: Any) -> None:
        self._check(
            session,
            "capabilities",
            data,
            checks.check_serial_only("capabilities", data),
        )
        await self._emit(
            session, "capabilitiesResponse", {"capabilities": list(self.capabilities)}
        )

    async def _handle_customCommandList(self, session: Session, data: Any) -> None:  # noqa: N802
        self._check(
            session, "customCommandList", data, checks.check_custom_command_list(data)
        )

    async def _handle_sendNextPrint(self, session: Session, data: Any) -> None:  # noqa: N802
        problems = checks.check_serial_only("sendNextPrint", data)
        self._check(session, "sendNextPrint", data, problems)
        with self.rec.lock:
            queue = self.queued_prints.get(session.serial or "")
            job = queue.popleft() if queue else None
        if job is not None:
            await self._emit(session, "print", job)

    async def _handle_getUrl(self, session: Session, data: Any) -> None:  # noqa: N802
        self._check(session, "getUrl", data, checks.check_get_url(data))
        if self.no_geturl_response:
            return
        scripted = self.geturl_replies.popleft() if self.geturl_replies else None
        if scripted is not None and not callable(scripted):
            await self._emit(session, "getUrlResponse", scripted)
            return
        d = data if isinstance(data, dict) else {}
        url_type = d.get("type")
        if url_type not in checks.URL_TYPES:
            reply: Any = {
                "status": "FAILED",
                "message": "bad getUrl request",
                "serialNumber": session.serial,
            }
        else:
            job_id = d.get("jobId") if isinstance(d.get("jobId"), str) else None
            ctype = "video/mp4" if url_type == "timelapse" else "image/jpeg"
            form = self.http.issue_form(
                session.serial,
                url_type,
                job_id,
                int(self.url_expires),
                int(
                    self.timelapse_max_size
                    if url_type == "timelapse"
                    else self.max_size
                ),
                ctype,
            )
            reply = {
                "status": "SUCCESS",
                "serialNumber": session.serial,
                "type": url_type,
                "expires": form.expires,
                "maxSize": form.max_size,
                "contentType": ctype,
                "method": "post",
                "url": f"{self.public_url or self.url}/upload",
                "fields": dict(form.fields),
            }
        if callable(scripted):
            reply = scripted(reply)
        await self._emit(session, "getUrlResponse", reply)

    async def _handle_unregister(self, session: Session, data: Any) -> None:
        if isinstance(data, str):
            self._violation(
                session, "unregister: payload must be {serialNumber}, not a string"
            )
        else:
            self._check(
                session,
                "unregister",
                data,
                checks.check_serial_only("unregister", data),
            )
        with self.rec.lock:
            printer = self.printers.get(session.serial or "")
            if printer is not None:
                printer.deleted = True
            self._revoke(session.serial)
        await self._emit(session, "unregisterResponse", {"status": "SUCCESS"})

    def _revoke(self, serial: str | None) -> None:
        now = time.monotonic()
        for s in self.sessions.values():
            if serial is not None and s.serial == serial and s.authenticated:
                s.authenticated, s.revoked_at = False, now
        self.rec.notify()

    # ======================================================================
    # control API (sync, thread-safe)
    # ======================================================================

    # -- faults --------------------------------------------------------------

    @property
    def refuse_connections(self) -> Any:
        return self._refuse

    @refuse_connections.setter
    def refuse_connections(self, value: Any) -> None:
        value = "503" if value is True else (False if value is None else value)
        if value not in REFUSE_MODES:
            raise ValueError(f"refuse_connections must be one of {REFUSE_MODES}")
        old, self._refuse = self._refuse, value
        started = self._loop_thread.loop is not None
        if (old == "closed") != (value == "closed") and started:
            coro = self._set_listening(value != "closed")
            if self._in_loop():
                self._spawn(coro)
            else:
                self._call(coro)

    @property
    def black_hole(self) -> Any:
        return self._black_hole

    @black_hole.setter
    def black_hole(self, value: Any) -> None:
        value = "socket" if value is True else (False if value is None else value)
        if value not in BLACK_HOLE_MODES:
            raise ValueError(f"black_hole must be one of {BLACK_HOLE_MODES}")
        self._black_hole = value

    def set_fault(self, name: str, value: Any = True) -> None:
        """Switch a fault (see FAULT_NAMES) or a setting (SETTING_NAMES)."""
        if name == "register_reply":
            self.register_replies.append(value)
        elif name == "geturl_reply":
            self.geturl_replies.append(value)
        elif name == "upload_fail":
            self.http.upload_fail = None if value in (None, False) else int(value)
        elif name in FAULT_NAMES or name in SETTING_NAMES:
            setattr(self, name, value)
        else:
            raise KeyError(
                f"unknown fault {name!r}; known: {FAULT_NAMES + SETTING_NAMES}"
            )

    def clear_faults(self) -> None:
        self.no_welcome = self.no_hello_response = False
        self.no_register_response = self.no_geturl_response = False
        self.welcome_payload = self.hello_reply = None
        self.register_replies.clear()
        self.geturl_replies.clear()
        self.http.upload_fail = None
        self.black_hole = False
        self.refuse_connections = False

    # -- accounts and printers -------------------------------------------------

    def add_account(self, email: str, pin: str) -> None:
        with self.rec.lock:
            self.accounts[email.strip().lower()] = str(pin)

    def add_printer(
        self,
        public_key_pem: str,
        *,
        mfg: str = "kl",
        email: str = DEFAULT_EMAIL,
        mac: str | None = None,
        mfg_sn: str | None = None,
        serial: str | None = None,
    ) -> str:
        """Provision a registered printer directly; returns its serial."""
        key = load_public_key(public_key_pem)
        if key is None:
            raise ValueError("not an RSA public key in PEM")
        with self.rec.lock:
            return self._new_printer(
                mfg, email.lower(), mac, key, public_key_pem, mfg_sn, serial
            ).serial

    def printer(self, serial: str) -> Printer | None:
        with self.rec.lock:
            return self.printers.get(serial)

    def delete_printer(self, serial: str) -> None:
        """Server-side deletion: the next hello for ``serial`` gets DELETED.

        Open sessions are left alone (the printer is not told)."""
        with self.rec.lock:
            self.printers[serial].deleted = True

    # -- pushing events --------------------------------------------------------

    def push(
        self,
        event: str,
        data: Any,
        serial: str | None = None,
        *,
        sid: str | None = None,
        include_unauthenticated: bool = False,
    ) -> int:
        """Emit ``event`` to the authenticated sockets of ``serial`` (all
        authenticated sockets when None; a given ``sid`` regardless of state).
        Returns how many sockets it was sent to."""
        return self._call(self._push(event, data, serial, sid, include_unauthenticated))

    async def _push(
        self,
        event: str,
        data: Any,
        serial: str | None,
        sid: str | None = None,
        include_unauthenticated: bool = False,
    ) -> int:
        with self.rec.lock:
            targets = [
                s
                for s in self.sessions.values()
                if not s.frozen
                and (sid is None or s.sid == sid)
                and (serial is None or s.serial == serial)
                and (s.authenticated or include_unauthenticated or sid is not None)
            ]
        for s in targets:
            await self._emit(s, event, data)
        return len(targets)

    def _command(
        self, event: str, serial: str, payload_serial: Any, **fields: Any
    ) -> int:
        data: dict[str, Any] = {}
        target = serial if payload_serial is _SAME else payload_serial
        if target is not None:
            data["serialNumber"] = target
        data.update({k: v for k, v in fields.items() if v is not None})
        return self.push(event, data, serial)

    def push_print(
        self,
        serial: str,
        job_id: str,
        job_name: str = "Polar test job",
        gcode_url: str | None = None,
        file_to_print: str | None = None,
        *,
        stl_url: str | None = None,
        config_url: str | None = None,
        threemf_url: str | None = None,
        extra: dict[str, Any] | None = None,
        payload_serial: Any = _SAME,
    ) -> int:
        return self._command(
            "print",
            serial,
            payload_serial,
            jobId=job_id,
            jobName=job_name,
            gcodeFile=gcode_url,
            stlFile=stl_url,
            configFile=config_url,
            threemfFile=threemf_url,
            fileToPrint=file_to_print,
            **(extra or {}),
        )

    def hold_printer_makes(self, on: bool = True) -> None:
        """Keep printer_makes answers waiting (on) or let them go (off)."""
        self._call(self.http.hold_printer_makes(on))

    def queue_print(
        self, serial: str, job_id: str, job_name: str = "Polar test job",
        gcode_url: str | None = None,
    ) -> None:
        """Queue a job in the cloud: the printer's next sendNextPrint gets it
        as a print."""
        job = {"serialNumber": serial, "jobId": job_id, "jobName": job_name}
        if gcode_url is not None:
            job["gcodeFile"] = gcode_url
        with self.rec.lock:
            self.queued_prints.setdefault(serial, collections.deque()).append(job)

    def pause(
        self, serial: str, type: str | None = None, *, payload_serial: Any = _SAME
    ) -> int:
        return self._command("pause", serial, payload_serial, type=type)

    def resume(self, serial: str, *, payload_serial: Any = _SAME) -> int:
        return self._command("resume", serial, payload_serial)

    def cancel(self, serial: str, *, payload_serial: Any = _SAME) -> int:
        return self._command("cancel", serial, payload_serial)

    def delete(
        self, serial: str, *, payload_serial: Any = _SAME, mark_deleted: bool = True
    ) -> int:
        """Cloud-side delete: push ``delete`` and (by default) delete the record."""
        if mark_deleted:
            with self.rec.lock:
                if serial in self.printers:
                    self.printers[serial].deleted = True
        n = self._command("delete", serial, payload_serial)
        if mark_deleted:
            with self.rec.lock:
                self._revoke(serial)
        return n

    def temperature(
        self, serial: str, *, payload_serial: Any = _SAME, **temps: Any
    ) -> int:
        return self._command("temperature", serial, payload_serial, **temps)

    def command(self, serial: str, command: str, *, payload_serial: Any = _SAME) -> int:
        return self._command("command", serial, payload_serial, command=command)

    def update(self, serial: str, *, payload_serial: Any = _SAME) -> int:
        return self._command("update", serial, payload_serial)

    def connect_printer(self, serial: str, *, payload_serial: Any = _SAME) -> int:
        return self._command("connectPrinter", serial, payload_serial)

    def custom_command(
        self, serial: str, command: str, *, payload_serial: Any = _SAME
    ) -> int:
        return self._command("customCommand", serial, payload_serial, command=command)

    def jog_printer(
        self, serial: str, jog: dict[str, Any], *, payload_serial: Any = _SAME
    ) -> int:
        return self._command("jogPrinter", serial, payload_serial, jogPrinter=jog)

    # -- links -------------------------------------------------------------------

    def drop(self, serial: str | None = None, how: str = "reset") -> int:
        """Kill the links of ``serial`` (all sockets when None).

        how: ``"reset"`` (TCP RST, like a crashed server), ``"close"`` (FIN
        without a Socket.IO goodbye) or ``"disconnect"`` (clean Socket.IO
        DISCONNECT from the server)."""
        if how not in ("reset", "close", "disconnect"):
            raise ValueError("how must be 'reset', 'close' or 'disconnect'")
        return self._call(self._drop(serial, how))

    def drop_all(self, how: str = "reset") -> int:
        return self.drop(None, how)

    async def _drop(self, serial: str | None, how: str) -> int:
        with self.rec.lock:
            targets = [
                s
                for s in self.sessions.values()
                if serial is None or s.serial == serial
            ]
        eio_sids = {s.eio_sid for s in targets}
        if serial is None:  # also half-connected and frozen links
            eio_sids |= set(self._eio_requests) | set(self._held)
            eio_sids |= set(self.sio.eio.sockets)
        for s in targets:
            if how == "disconnect" and not s.frozen:
                await self.sio.disconnect(s.sid)
                eio_sids.discard(s.eio_sid)
        for eio_sid in eio_sids:
            self._kill_eio(eio_sid, reset=how == "reset")
        return len(targets)

    def freeze(self, serial: str | None = None) -> int:
        """Make the links of ``serial`` (all when None) half-open: the server
        stops sending anything (no pings) and ignores input, the TCP
        connection stays open.  One way: use drop() to end it."""
        return self._call(self._freeze(serial))

    async def _freeze(self, serial: str | None) -> int:
        with self.rec.lock:
            targets = [
                s
                for s in self.sessions.values()
                if not s.frozen and (serial is None or s.serial == serial)
            ]
            for s in targets:
                s.frozen = True
        for s in targets:
            self._freeze_eio(s.eio_sid)
        return len(targets)

    # -- files and uploads ---------------------------------------------------------

    def add_file(
        self, name: str, content: bytes = b"", mode: str = "ok", **options: Any
    ) -> str:
        """Serve ``content`` at ``/files/<name>`` in ``mode``; returns the URL.

        options: content_type, rate (slow, bytes/s), length_delta
        (lying_length), target (redirect to a file name or URL), hops
        (redirect chain length when no target), status (redirect code)."""
        return self.http.add_file(name, content, mode, **options)

    def file_url(self, name: str) -> str:
        return self.http.file_url(name)

    def file_requests(self, name: str) -> int:
        with self.rec.lock:
            return self.rec.file_hits.get(name, 0)

    @property
    def uploads(self) -> list[dict[str, Any]]:
        return self.rec.uploads

    @property
    def upload_attempts(self) -> list[dict[str, Any]]:
        return self.rec.upload_attempts

    def upload_form(self, signature: str) -> UploadForm | None:
        with self.rec.lock:
            return self.http.forms.get(signature)

    def wait_upload(
        self,
        timeout: float = 30.0,
        since: float | None = None,
        predicate: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            for up in self.rec.uploads:
                if (since is None or up["t"] >= since) and _safe(predicate, up):
                    return up
            return None

        return self.rec.wait_until(check, timeout, "an upload")

    # ======================================================================
    # records and waiting
    # ======================================================================

    @property
    def violations(self) -> list[str]:
        return self.rec.violations

    @property
    def log(self) -> list[SimEvent]:
        return self.rec.log

    @staticmethod
    def now() -> float:
        """The clock used for event times (time.monotonic)."""
        return time.monotonic()

    def events(
        self,
        name: str | None = None,
        direction: str | None = None,
        serial: str | None = None,
        since: float | None = None,
    ) -> list[SimEvent]:
        return self.rec.select(name, direction, serial, since)

    def received(
        self, name: str, serial: str | None = None, since: float | None = None
    ) -> list[Any]:
        """Payloads of accepted inbound ``name`` events."""
        return [ev.data for ev in self.rec.select(name, IN, serial, since, ok=True)]

    def sent(
        self, name: str, serial: str | None = None, since: float | None = None
    ) -> list[Any]:
        """Payloads of outbound ``name`` events."""
        return [ev.data for ev in self.rec.select(name, OUT, serial, since)]

    def wait_event(
        self,
        name: str,
        predicate: Callable[[Any], bool] | None = None,
        timeout: float = 30.0,
        since: float | None = None,
        serial: str | None = None,
        direction: str | None = IN,
        ok: bool | None = True,
    ) -> SimEvent:
        """Wait for a recorded event (inbound and accepted by default)."""

        pos = 0  # the log only grows (or is cleared), so resume the scan

        def check() -> SimEvent | None:
            nonlocal pos
            log = self.rec.log
            if pos > len(log):
                pos = 0
            for ev in log[pos:]:
                if (
                    ev.name == name
                    and (direction is None or ev.direction == direction)
                    and (serial is None or ev.serial == serial)
                    and (since is None or ev.t >= since)
                    and (ok is None or ev.ok == ok)
                    and _safe(predicate, ev.data)
                ):
                    return ev
            pos = len(log)
            return None

        return self.rec.wait_until(
            check, timeout, f"event {name!r} ({direction or 'any'})"
        )

    def wait_for(
        self,
        name: str,
        predicate: Callable[[Any], bool] | None = None,
        timeout: float = 30.0,
        since: float | None = None,
        serial: str | None = None,
        direction: str | None = None,
    ) -> Any:
        """Wait for an event and return its payload.

        ``direction`` defaults to "in" for printer events, "conn" for
        connect/authenticated/disconnect/refused and "out" for the rest.
        Inbound events must have been accepted (``ok``)."""
        if direction is None:
            if name in ("connect", "authenticated", "disconnect", "refused"):
                direction = CONN
            elif name in INBOUND_EVENTS:
                direction = IN
            else:
                direction = OUT
        ok = True if direction == IN else None
        return self.wait_event(
            name, predicate, timeout, since, serial, direction, ok
        ).data

    def wait_until(
        self, check: Callable[[], Any], timeout: float = 30.0, what: str = ""
    ) -> Any:
        """Wait until ``check()`` is truthy (re-evaluated on every change)."""
        return self.rec.wait_until(check, timeout, what or "condition")

    def connects(self, serial: str | None = None) -> int:
        """Socket connects (serial None) or successful hellos for ``serial``."""
        if serial is None:
            return len(self.rec.select("connect", CONN))
        return len(self.rec.select("authenticated", CONN, serial))

    def disconnects(self, serial: str | None = None) -> int:
        return len(self.rec.select("disconnect", CONN, serial))

    def live_sessions(self, serial: str | None = None) -> int:
        """Connected sockets currently authenticated as ``serial`` (any serial
        when None).  Frozen links count until the server times them out."""
        with self.rec.lock:
            return sum(
                1
                for s in self.sessions.values()
                if s.authenticated and (serial is None or s.serial == serial)
            )

    def connected(self) -> int:
        """All connected Socket.IO sockets, authenticated or not."""
        with self.rec.lock:
            return len(self.sessions)

    def connection_attempts(
        self, since: float | None = None, outcome: str | None = None
    ) -> list[float]:
        """Monotonic times of Engine.IO handshakes, refused ones included.
        outcomes: open, refused_503, refused_reset, refused_sio,
        black_hole_http.  In refuse mode "closed" nothing reaches the
        server, so nothing is recorded."""
        with self.rec.lock:
            return [
                t
                for t, o in self.rec.attempts
                if (outcome is None or o == outcome) and (since is None or t >= since)
            ]

    def reset_records(self) -> None:
        """Forget recorded events, violations, attempts, uploads and hits
        (printers, accounts, files, sessions and faults stay)."""
        with self.rec.lock:
            self.rec.clear()
            self._job_reports.clear()

    # ======================================================================
    # HTTP control API for the CLI/demo: /_sim/...
    # ======================================================================

    def _add_control_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/_sim/push", self._api_push)
        r.add_get("/_sim/events", self._api_events)
        r.add_post("/_sim/fault", self._api_fault)
        r.add_post("/_sim/files", self._api_files)
        r.add_post("/_sim/drop", self._api_drop)
        r.add_post("/_sim/account", self._api_account)
        r.add_get("/_sim/state", self._api_state)

    async def _api(
        self, request: web.Request, fn: Callable[[dict[str, Any]], Any]
    ) -> web.Response:
        try:
            body = await request.json() if request.can_read_body else {}
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            result = fn(body)
            if asyncio.iscoroutine(result):
                result = await result
            return web.json_response(result)
        except (KeyError, ValueError, TypeError) as e:
            return web.json_response({"error": str(e)}, status=400)

    async def _api_push(self, request: web.Request) -> web.Response:
        async def go(b: dict[str, Any]) -> dict[str, Any]:
            n = await self._push(b["event"], b.get("data"), b.get("serial"))
            return {"sent": n}

        return await self._api(request, go)

    async def _api_events(self, request: web.Request) -> web.Response:
        since = int(request.query.get("since", "0"))
        name = request.query.get("name")
        with self.rec.lock:
            evs = [
                ev
                for ev in self.rec.log
                if ev.seq > since and (not name or ev.name == name)
            ]
            violations = list(self.rec.violations)
        return web.json_response(
            {
                "events": [
                    {
                        "seq": ev.seq,
                        "t": ev.t,
                        "sid": ev.sid,
                        "serial": ev.serial,
                        "direction": ev.direction,
                        "name": ev.name,
                        "data": ev.data,
                        "ok": ev.ok,
                    }
                    for ev in evs
                ],
                "next": evs[-1].seq if evs else since,
                "violations": violations,
            },
            dumps=_json_dumps,
        )

    async def _api_fault(self, request: web.Request) -> web.Response:
        def go(b: dict[str, Any]) -> dict[str, Any]:
            self.set_fault(b["name"], b.get("value", True))
            return {"ok": True}

        return await self._api(request, go)

    async def _api_files(self, request: web.Request) -> web.Response:
        def go(b: dict[str, Any]) -> dict[str, Any]:
            content = (
                base64.b64decode(b["content_b64"])
                if "content_b64" in b
                else str(b.get("content", "")).encode()
            )
            options = {
                k: b[k]
                for k in ("content_type", "rate", "length_delta", "target", "hops")
                if k in b
            }
            return {
                "url": self.add_file(b["name"], content, b.get("mode", "ok"), **options)
            }

        return await self._api(request, go)

    async def _api_drop(self, request: web.Request) -> web.Response:
        async def go(b: dict[str, Any]) -> dict[str, Any]:
            return {"dropped": await self._drop(b.get("serial"), b.get("how", "reset"))}

        return await self._api(request, go)

    async def _api_account(self, request: web.Request) -> web.Response:
        def go(b: dict[str, Any]) -> dict[str, Any]:
            self.add_account(b["email"], b["pin"])
            return {"ok": True}

        return await self._api(request, go)

    async def _api_state(self, request: web.Request) -> web.Response:
        with self.rec.lock:
            state = {
                "url": self.url,
                "sessions": [
                    {
                        "sid": s.sid,
                        "serial": s.serial,
                        "authenticated": s.authenticated,
                        "transport": s.transport,
                        "frozen": s.frozen,
                    }
                    for s in self.sessions.values()
                ],
                "printers": [
                    {
                        "serial": p.serial,
                        "mfg": p.mfg,
                        "mac": p.mac,
                        "deleted": p.deleted,
                    }
                    for p in self.printers.values()
                ],
                "violations": list(self.rec.violations),
                "uploads": len(self.rec.uploads),
            }
        return web.json_response(state)


def _safe(predicate: Callable[[Any], bool] | None, value: Any) -> bool:
    if predicate is None:
        return True
    try:
        return bool(predicate(value))
    except Exception:
        return False


def _json_dumps(obj: Any) -> str:
    import json

    return json.dumps(obj, default=repr)
