"""Run a real Moonraker (PyPI, in .venv-moonraker) in front of a test klippy.

    ensure_moonraker_venv()              # scripts/moonraker_env.sh, idempotent
    mr = Moonraker(k).start()            # k: a started tests.testbed.klippy.Klippy
    mr.get("/printer/polar_cloud/status")             # -> "result" or MoonrakerError
    mr.post("/printer/polar_cloud/register", email=..., pin=...)
    ws = mr.websocket()
    ws.call("printer.objects.subscribe", {"objects": {"polar_cloud": None}})
    ws.wait_status(lambda st: st["polar_cloud"]["state"] == "online")
    mr.stop()

Moonraker uses the klippy's work directory as its data path (config/,
gcodes/, logs/moonraker.log, database/), exactly as on a printer_data host,
so the module's identity folder (<data>/polar_cloud) sits where it would on
a real machine.  Nothing reaches the internet: the announcement feeds are
off and an empty misc/usb.ids keeps Moonraker from fetching one.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from tests.testbed.jsonsocket import JsonSocket
from tests.testbed.klippy import REPO, Klippy
from tests.testbed.procs import free_port, launch, log_tail, read_log, stop_process
from tests.testbed.servers import BackgroundServer, process_gone, wait_ready

VENV = REPO / ".venv-moonraker"
ENV_SCRIPT = REPO / "scripts" / "moonraker_env.sh"

_CONF = """\
[server]
host: 127.0.0.1
port: {port}
klippy_uds_address: {klippy_uds}

[file_manager]

[authorization]
trusted_clients:
    127.0.0.1/32

[machine]
provider: none
validate_service: False
validate_config: False

[announcements]
enable_moonlight: False
"""

_venv_lock = threading.Lock()


def ensure_moonraker_venv() -> Path:
    """Build .venv-moonraker if needed (scripts/moonraker_env.sh); return its
    python.  Raises RuntimeError with pip's output when it cannot."""
    with _venv_lock:
        proc = subprocess.run(["bash", str(ENV_SCRIPT)], cwd=REPO,
                              capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError("scripts/moonraker_env.sh failed:\n%s%s"
                           % (proc.stdout, proc.stderr))
    return VENV / "bin" / "python"


class MoonrakerError(Exception):
    """Moonraker answered with {"error": {"code", "message"}}."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__("%s: %s" % (code, message))
        self.code = code
        self.message = message


def _no_proxy_opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Moonraker(BackgroundServer):
    """One Moonraker process serving the data directory of klippy `k`."""

    def __init__(self, k: Klippy, extra_conf: str = "") -> None:
        self.klippy = k
        self.data_path = k.workdir
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % (self.port,)
        self.ws_url = "ws://127.0.0.1:%d/websocket" % (self.port,)
        self.conf_path = k.config_dir / "moonraker.conf"
        self.log_path = k.logs_dir / "moonraker.log"
        self.stdout_path = k.logs_dir / "moonraker.out"
        self.extra_conf = extra_conf
        # Moonraker's own unix socket; next to klippy's (kept short there)
        self.uds_path = k.api_path.parent / "moonraker.sock"
        self._proc: subprocess.Popen | None = None
        self._opener = _no_proxy_opener()
        self._sockets: list[MoonrakerSocket] = []

    # -- lifecycle
    def start(self, timeout: float = 60) -> Moonraker:
        python = ensure_moonraker_venv()
        self.conf_path.write_text(_CONF.format(
            port=self.port, klippy_uds=self.klippy.api_path) + self.extra_conf)
        misc = self.data_path / "misc"
        misc.mkdir(exist_ok=True)
        (misc / "usb.ids").touch()
        with open(self.stdout_path, "ab") as out:
            self._proc = launch(
                [str(python), "-m", "moonraker", "-d", str(self.data_path),
                 "-c", str(self.conf_path), "-l", str(self.log_path),
                 "-u", str(self.uds_path)],
                cwd=self.data_path, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT)
        self.wait_klippy_ready(timeout)
        return self

    def wait_klippy_ready(self, timeout: float = 60) -> dict:
        """Poll /server/info until Moonraker is connected to a ready klippy."""
        last: list[Any] = [None]

        def ready() -> dict | None:
            try:
                last[0] = self.get("/server/info")
            except (OSError, MoonrakerError) as e:
                last[0] = e
                return None
            return last[0] if last[0].get("klippy_state") == "ready" else None

        try:
            return wait_ready(ready, timeout, "moonraker",
                              process_gone(self._proc))
        except (RuntimeError, TimeoutError) as e:
            raise type(e)("%s (last: %r)\n%s" % (e, last[0], self.log_tail())) \
                from None

    def stop(self) -> None:
        for ws in self._sockets:
            ws.close()
        proc, self._proc = self._proc, None
        stop_process(proc)

    def log_text(self) -> str:
        return read_log(self.log_path)

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    # -- HTTP
    def request(self, method: str, path: str, body: dict | None = None,
                timeout: float = 30) -> tuple[int, bytes]:
        """Raw HTTP exchange: (status, body bytes); errors are not raised."""
        data = None
        headers = {}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers=headers)
        try:
            with self._opener.open(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def _result(self, status: int, raw: bytes) -> Any:
        try:
            msg = json.loads(raw)
        except ValueError:
            raise MoonrakerError(status, raw.decode(errors="replace")) from None
        if "error" in msg:
            err = msg["error"]
            raise MoonrakerError(err.get("code", status), err.get("message", ""))
        return msg["result"]

    def get(self, path: str) -> Any:
        return self._result(*self.request("GET", path))

    def post(self, path: str, **params: Any) -> Any:
        return self._result(*self.request("POST", path, params))

    # -- websocket
    def websocket(self) -> MoonrakerSocket:
        ws = MoonrakerSocket(self.ws_url)
        self._sockets.append(ws)
        return ws


class MoonrakerSocket(JsonSocket):
    """A JSON-RPC 2.0 client on Moonraker's /websocket, as a UI uses it.

    Notifications are recorded in order; `notify_status_update` diffs are
    merged into `status` (and each merged state kept in `history`)."""

    def __init__(self, url: str, timeout: float = 10) -> None:
        super().__init__(url, timeout=timeout, suppress_origin=False,
                         name="moonraker-ws")
        self.notifications: list[dict] = []
        self.status: dict[str, dict] = {}
        self.history: list[dict[str, dict]] = []
        self.start_reading()

    def on_message(self, msg: dict) -> None:
        with self._cond:
            self.notifications.append(msg)
            if msg.get("method") == "notify_status_update":
                self._merge(msg["params"][0])
            self._cond.notify_all()

    def _merge(self, diff: dict) -> None:
        for name, fields in diff.items():
            self.status[name] = dict(self.status.get(name, {}), **fields)
        self.history.append({n: dict(f) for n, f in self.status.items()})

    def call(self, method: str, params: dict | None = None,
             timeout: float = 30) -> Any:
        req: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            req["params"] = params
        try:
            msg = self.request(req, timeout)
        except TimeoutError:
            raise TimeoutError("no reply to %s within %.0fs"
                               % (method, timeout)) from None
        if msg is None:
            raise ConnectionError("websocket closed waiting for %s" % (method,))
        if "error" in msg:
            raise MoonrakerError(msg["error"].get("code", 0),
                                 msg["error"].get("message", ""))
        return msg["result"]

    def subscribe(self, objects: dict[str, list[str] | None]) -> dict:
        """printer.objects.subscribe; the initial status seeds `status`."""
        result = self.call("printer.objects.subscribe", {"objects": objects})
        with self._cond:
            self._merge(result["status"])
        return result["status"]

    def wait_status(self, predicate: Callable[[dict[str, dict]], bool],
                    timeout: float = 60) -> dict[str, dict]:
        """Wait until the merged subscribed status satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if predicate(self.status):
                    return {n: dict(f) for n, f in self.status.items()}
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    raise TimeoutError("status condition not met within %.0fs"
                                       " (closed=%s); last status: %r"
                                       % (timeout, self.closed, self.status))
                self._cond.wait(left)
