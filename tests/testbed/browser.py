"""Headless Chromium (Debian's `chromium`) driven over the DevTools protocol.

    with Chromium(tmp_path) as browser:
        page = browser.page()
        page.viewport(1100, 900)
        page.goto("http://127.0.0.1:8080/polar-cloud/")
        page.wait_js("document.querySelector('#state').dataset.state === 'online'")
        page.type("#email", "me@example.org")
        page.click("#register-button")          # real mouse events
        page.screenshot(path)                   # full page PNG
        assert page.problems == []              # JS errors, CSP violations

No browser is downloaded: the system chromium runs with a fresh profile and
no background networking.  Waits are in-page promises (a MutationObserver
re-checks the condition on every DOM change), bounded by a timeout.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.testbed.jsonsocket import JsonSocket
from tests.testbed.procs import launch, stop_process
from tests.testbed.servers import BackgroundServer, process_gone, wait_ready

CHROMIUM_NAMES = ("chromium", "chromium-browser")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu",
    "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--no-default-browser-check",
    "--disable-extensions", "--disable-default-apps", "--mute-audio",
    "--no-proxy-server", "--disable-features=Translate,MediaRouter",
    "--password-store=basic", "--remote-debugging-port=0",
]


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class BrowserError(Exception):
    pass


class Page(JsonSocket):
    """One tab, over its own DevTools websocket."""

    def __init__(self, ws_url: str) -> None:
        super().__init__(ws_url, timeout=10, suppress_origin=True, name="cdp")
        self.events: list[dict] = []
        # Uncaught exceptions, console.error and CSP/network errors
        self.problems: list[str] = []
        self.start_reading()
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Log.enable")

    def on_message(self, msg: dict) -> None:
        method, params = msg.get("method", ""), msg.get("params", {})
        problem = None
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            problem = "exception: %s" % (
                details.get("exception", {}).get("description")
                or details.get("text"),)
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            problem = "console.error: %s" % (
                " ".join(str(a.get("value", a.get("description", "")))
                         for a in params.get("args", [])),)
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            if entry.get("level") == "error":
                problem = "%s: %s" % (entry.get("source"), entry.get("text"))
        with self._cond:
            self.events.append(msg)
            if problem:
                self.problems.append(problem)
            self._cond.notify_all()

    def send(self, method: str, timeout: float = 30, **params: Any) -> dict:
        try:
            msg = self.request({"method": method, "params": params}, timeout)
        except TimeoutError:
            raise BrowserError("%s: no answer within %.0fs"
                               % (method, timeout)) from None
        if msg is None:
            raise BrowserError("DevTools connection closed during %s" % (method,))
        if "error" in msg:
            raise BrowserError("%s: %s" % (method, msg["error"]))
        return msg.get("result", {})

    def wait_event(self, method: str, timeout: float = 30, since: int = 0) -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self.events[since:]:
                    if ev.get("method") == method:
                        return ev.get("params", {})
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrowserError("no %s within %.0fs" % (method, timeout))
                self._cond.wait(left)

    # -- page
    def viewport(self, width: int, height: int, mobile: bool = False,
                 scale: float = 1) -> None:
        self.send("Emulation.setDeviceMetricsOverride", width=width,
                  height=height, deviceScaleFactor=scale, mobile=mobile)

    def goto(self, url: str, timeout: float = 30) -> None:
        with self._lock:
            mark = len(self.events)
        result = self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError("cannot open %s: %s" % (url, result["errorText"]))
        self.wait_event("Page.loadEventFired", timeout, since=mark)

    def js(self, expression: str, timeout: float = 30) -> Any:
        """Evaluate an expression (promises are awaited); its JSON value."""
        result = self.send("Runtime.evaluate", timeout=timeout + 5,
                           expression=expression, awaitPromise=True,
                           returnByValue=True, userGesture=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(details.get("exception", {}).get("description")
                               or details.get("text") or repr(details))
        return result.get("result", {}).get("value")

    def wait_js(self, condition: str, timeout: float = 30) -> Any:
        """Wait until the JS expression `condition` is truthy; its value.

        Re-checked on every DOM change and every 200 ms (for conditions on
        state that is not in the DOM)."""
        script = """new Promise((resolve, reject) => {
            const check = () => {
                let value;
                try { value = (%s); } catch (e) { value = undefined; }
                if (value) { done(); resolve(value); }
            };
            const obs = new MutationObserver(check);
            const tick = setInterval(check, 200);
            const timer = setTimeout(() => {
                done(); reject(new Error("timed out waiting for: " + %s));
            }, %d);
            function done() {
                obs.disconnect(); clearInterval(tick); clearTimeout(timer);
            }
            obs.observe(document, {subtree: true, childList: true,
                                   characterData: true, attributes: true});
            check();
        })""" % (condition, json.dumps(condition), int(timeout * 1000))
        return self.js(script, timeout=timeout)

    def text(self, selector: str) -> str:
        return self.js("document.querySelector(%s).textContent.trim()"
                       % (json.dumps(selector),))

    def visible(self, selector: str) -> bool:
        return self.js("(() => { const e = document.querySelector(%s);"
                       " return !!e && e.getClientRects().length > 0; })()"
                       % (json.dumps(selector),))

    def _center(self, selector: str) -> tuple[float, float]:
        box = self.wait_js(
            "(() => { const e = document.querySelector(%s);"
            " if (!e || !e.getClientRects().length || e.disabled) return null;"
            " e.scrollIntoView({block: 'center'});"
            " const r = e.getBoundingClientRect();"
            " return {x: r.left + r.width / 2, y: r.top + r.height / 2}; })()"
            % (json.dumps(selector),), timeout=10)
        return box["x"], box["y"]

    def click(self, selector: str) -> None:
        """A real mouse click in the middle of the (visible, enabled) element."""
        x, y = self._center(selector)
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y,
                      button="left", clickCount=1)

    def type(self, selector: str, text: str) -> None:
        """Click into a field, select what is there and type `text`."""
        self.click(selector)
        self.js("document.querySelector(%s).select()" % (json.dumps(selector),))
        self.send("Input.insertText", text=text)

    def screenshot(self, path: Path, full_page: bool = True) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            metrics = self.send("Page.getLayoutMetrics")
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            params["captureBeyondViewport"] = True
            params["clip"] = {"x": 0, "y": 0, "width": size["width"],
                              "height": size["height"], "scale": 1}
        data = self.send("Page.captureScreenshot", **params)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path



class Chromium(BackgroundServer):
    """A headless chromium process with a fresh profile in workdir."""

    def __init__(self, workdir: Path, binary: str | None = None) -> None:
        self.binary = binary or find_chromium()
        if not self.binary:
            raise FileNotFoundError("chromium is not installed"
                                    " (apt-get install chromium)")
        self.profile = Path(workdir) / "chromium-profile"
        self.log_path = Path(workdir) / "chromium.log"
        self._proc: subprocess.Popen | None = None
        self._pages: list[Page] = []
        self.port = 0

    def start(self, timeout: float = 30) -> Chromium:
        shutil.rmtree(self.profile, ignore_errors=True)
        self.profile.mkdir(parents=True)
        cmd = [self.binary, *FLAGS, "--user-data-dir=%s" % (self.profile,),
               "about:blank"]
        with open(self.log_path, "ab") as log:
            self._proc = launch(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log)
        active = self.profile / "DevToolsActivePort"
        wait_ready(lambda: active.exists()
                   and active.read_text().count("\n") >= 1, timeout,
                   "chromium (DevTools)", process_gone(self._proc,
                                                       self.log_path))
        self.port = int(active.read_text().splitlines()[0])
        return self

    def page(self) -> Page:
        """The first tab (about:blank)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open("http://127.0.0.1:%d/json/list" % (self.port,),
                         timeout=10) as resp:
            targets = json.loads(resp.read())
        tabs = [t for t in targets if t.get("type") == "page"]
        if not tabs:
            raise BrowserError("chromium has no open tab: %r" % (targets,))
        page = Page(tabs[0]["webSocketDebuggerUrl"])
        self._pages.append(page)
        return page

    def stop(self) -> None:
        for page in self._pages:
            page.close()
        proc, self._proc = self._proc, None
        # a chromium that died on its own keeps its profile
        if stop_process(proc):
            shutil.rmtree(self.profile, ignore_errors=True)
