"""The /polar-cloud/ page in a real browser.

nginx serves web/ through install.sh's --nginx snippet inside a MainsailOS
server block that proxies the API and /websocket to a real Moonraker, in
front of a real klippy whose printer talks to the strict local Polar Cloud.
Headless Chromium (Debian's) opens the page, registers and unregisters the
printer with real clicks and typing; the simulator confirms what happened.
Screenshots in tests/artifacts/web/: polar-cloud.png (online, desktop),
polar-cloud-phone.png (online, 390 px wide), polar-cloud-register.png (the
registration form), polar-cloud-confirm.png (the unregister dialog),
polar-cloud-plate.png (the build plate to confirm after a print).
"""
from __future__ import annotations

import json
import urllib.request

import pytest

from tests.testbed.browser import BrowserError, Chromium, Page, find_chromium
from tests.testbed.fixtures import ARTIFACTS
from tests.testbed.gcode_files import demo_print
from tests.testbed.helpers import EMAIL, PIN, polar_status
from tests.testbed.moonraker import Moonraker
from tests.testbed.nginx import Nginx, find_nginx

SHOTS = ARTIFACTS / "web"
STATE = "document.querySelector('#state').dataset.state"

pytestmark = [
    pytest.mark.skipif(find_chromium() is None, reason=(
        "Debian chromium is not installed (.ci/run installs it; by hand:"
        " apt-get install chromium)")),
    pytest.mark.skipif(find_nginx() is None, reason=(
        "nginx is not installed (.ci/run installs it; by hand:"
        " apt-get install nginx-light)")),
]


@pytest.fixture(scope="module")
def k(polar_klippy):
    return polar_klippy("klipper", require_plate_clear="True")


@pytest.fixture(scope="module")
def mr(k):
    m = Moonraker(k).start()
    yield m
    m.stop()


@pytest.fixture(scope="module")
def site(mr, tmp_path_factory):
    with Nginx(tmp_path_factory.mktemp("nginx"), mr.port) as n:
        yield n


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with Chromium(tmp_path_factory.mktemp("chromium")) as b:
        yield b


@pytest.fixture(scope="module")
def page(browser, site) -> Page:
    p = browser.page()
    p.viewport(1000, 860)
    p.goto(site.url + "/polar-cloud/")
    return p


def fetch(url: str) -> tuple[int, str, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def messages(page: Page) -> list[tuple[str, str]]:
    return [tuple(m) for m in page.js(
        "[...document.querySelectorAll('#messages li')]"
        ".map(li => [li.dataset.kind, li.querySelector('span').textContent])")]


def wait_message(page: Page, text: str, kind: str | None = None,
                 timeout: float = 60) -> None:
    """Wait for a line in the page's Messages list (of `kind` if given)."""
    cond = ("[...document.querySelectorAll('#messages li')].some(li =>"
            " li.querySelector('span').textContent.includes(%s)%s)"
            % (json.dumps(text),
               " && li.dataset.kind === %s" % (json.dumps(kind),) if kind else ""))
    try:
        page.wait_js(cond, timeout)
    except BrowserError:
        pytest.fail("no %s message %r; messages: %r"
                    % (kind or "", text, messages(page)))


def test_the_snippet_serves_the_page_next_to_moonraker(site):
    status, ctype, body = fetch(site.url + "/polar-cloud/")
    assert status == 200 and ctype.startswith("text/html")
    assert b"<title>Polar Cloud" in body
    # Without the trailing slash: redirected to the page, not Mainsail's
    status, ctype, body = fetch(site.url + "/polar-cloud")
    assert status == 200 and b"<title>Polar Cloud" in body
    for name, want in (("polar-cloud.js", "javascript"),
                       ("polar-cloud.css", "text/css")):
        status, ctype, _ = fetch(site.url + "/polar-cloud/" + name)
        assert status == 200 and want in ctype, (name, ctype)
    # The API is Moonraker's, through the same origin
    status, ctype, body = fetch(site.url + "/printer/polar_cloud/status")
    assert status == 200 and json.loads(body)["result"]["state"] == "unregistered"
    # Nothing outside web/ is reachable through the alias
    for path in ("/polar-cloud/../install.sh", "/polar-cloud/%2e%2e/install.sh",
                 "/polar-cloud/..%2finstall.sh", "/polar-cloud../install.sh"):
        status, _, body = fetch(site.url + path)
        assert b"#!/bin/bash" not in body, path


def test_page_shows_the_unregistered_printer(page, sim):
    page.wait_js("%s === 'unregistered'" % (STATE,))
    page.wait_js("document.querySelector('#link').dataset.link === 'ready'")
    assert page.text("#state") == "Not registered"
    assert page.text("#server") == sim.url
    assert page.text("#serial") == "not registered"
    assert page.visible("#register-form") and not page.visible("#unregister-button")
    assert page.js("document.querySelector('#pin').type") == "password"
    page.screenshot(SHOTS / "polar-cloud-register.png")


def test_bad_input_is_explained(page, sim):
    page.type("#email", EMAIL)
    page.click("#register-button")                 # no PIN: stopped in the page
    wait_message(page, "Enter the PIN", "error")
    assert page.js("document.activeElement.id") == "pin"
    page.type("#pin", "12 34")                     # refused by the module: a 400
    page.click("#register-button")
    wait_message(page, "Registration not started: PIN must be letters and"
                 " digits only", "error")
    assert page.js("document.querySelector('#pin').value") == ""
    assert sim.received("register") == []
    assert page.js(STATE) == "unregistered"


def test_cloud_text_is_shown_as_text(page, k, sim):
    """A refusal reason from the cloud is displayed, never interpreted."""
    evil = "<img src=x onerror=window.__pwned=1>"
    sim.set_fault("register_reply", {"status": "FAILED", "reason": evil})
    try:
        page.type("#email", EMAIL)
        page.type("#pin", PIN)
        page.click("#register-button")
        page.wait_js("document.querySelector('#last-error').textContent"
                     ".includes(%s)" % (json.dumps(evil),))
        wait_message(page, "registration failed", "error")
    finally:
        sim.set_fault("register_reply", None)
    assert evil in polar_status(k)["last_error"]
    assert page.js("document.querySelectorAll('img').length") == 0
    assert page.js("window.__pwned === undefined") is True
    assert page.js(STATE) == "unregistered"


def test_the_build_plate_is_confirmed_on_the_page(page, k):
    """After a print, the page asks for the plate to be cleared; its button
    confirms it through polar_cloud/plate_cleared."""
    assert not page.visible("#plate-card")
    k.write_gcode("plate.gcode", demo_print(moves=20, hotend=0, bed=0,
                                            feedrate=3000))
    k.gcode('SDCARD_PRINT_FILE FILENAME="plate.gcode"')
    page.wait_js("!document.querySelector('#plate-card').hidden", timeout=60)
    wait_message(page, "clear the build plate")
    page.screenshot(SHOTS / "polar-cloud-plate.png")
    page.click("#plate-button")
    page.wait_js("document.querySelector('#plate-card').hidden")
    wait_message(page, "build plate cleared (web page)", "ok")
    assert polar_status(k)["plate_clear"] is True


def test_page_follows_a_klippy_restart(page, k, mr):
    """Moonraker drops subscriptions when klippy goes; the page subscribes
    again on notify_klippy_ready (the registration below needs it live)."""
    k.restart()
    mr.wait_klippy_ready()
    page.wait_js("%s === 'unregistered' && document.querySelector('#link')"
                 ".dataset.link === 'ready'" % (STATE,))
    assert page.text("#server") != "—"


def test_register_and_unregister_from_the_page(page, browser, k, sim):
    since = sim.now()
    page.type("#email", EMAIL)
    page.type("#pin", PIN)
    page.click("#register-button")
    # The PIN leaves the page at once and is kept nowhere
    assert page.js("document.querySelector('#pin').value") == ""
    page.wait_js("%s === 'online'" % (STATE,), timeout=90)
    serial = polar_status(k)["serial_number"]
    regs = sim.received("register", since=since)
    assert len(regs) == 1 and regs[0]["email"] == EMAIL
    assert sim.printer(serial) is not None and sim.live_sessions(serial) == 1
    page.wait_js("document.querySelector('#serial').textContent === %s"
                 % (json.dumps(serial),))
    assert page.text("#state") == "Online"
    assert page.text("#job").startswith("none")
    assert page.visible("#unregister-button") and not page.visible("#register-form")
    wait_message(page, "registered, serial number %s" % (serial,), "ok")
    # Where the PIN went, and the shell script that avoids it, once
    wait_message(page, "scripts/register.sh", "note")
    notes = [text for kind, text in messages(page) if "register.sh" in text]
    assert len(notes) == 1 and "klippy.log" in notes[0], notes
    assert page.js("localStorage.length + sessionStorage.length") == 0
    assert page.js("document.cookie") == ""
    assert PIN not in page.js("document.documentElement.outerHTML")

    page.viewport(1000, 860)
    page.screenshot(SHOTS / "polar-cloud.png")
    page.viewport(390, 844, mobile=True, scale=2)
    assert page.js("document.documentElement.scrollWidth <= innerWidth") is True
    page.screenshot(SHOTS / "polar-cloud-phone.png")
    page.viewport(1000, 860)

    # Unregister asks first; Cancel changes nothing
    page.click("#unregister-button")
    page.wait_js("document.querySelector('#confirm').open")
    assert page.text("#confirm-serial") == serial
    page.screenshot(SHOTS / "polar-cloud-confirm.png", full_page=False)
    page.click("#confirm button[value=cancel]")
    page.wait_js("!document.querySelector('#confirm').open")
    assert sim.received("unregister", since=since) == []
    assert page.js(STATE) == "online"

    page.click("#unregister-button")
    page.wait_js("document.querySelector('#confirm').open")
    page.click("#confirm-unregister")
    page.wait_js("%s === 'unregistered'" % (STATE,))
    assert sim.received("unregister", since=since) == [{"serialNumber": serial}]
    assert sim.live_sessions(serial) == 0
    assert not (k.state_path / "key.pem").exists()
    page.wait_js("document.querySelector('#serial').textContent === 'not registered'")
    assert page.visible("#register-form") and not page.visible("#unregister-button")
    wait_message(page, "printer %s unregistered" % (serial,))
    # No script error, CSP violation or failed load, but the one 400 above
    problems = [p for p in page.problems
                if not (p.startswith("network:") and "status of 400" in p)]
    assert problems == [], page.problems
    assert sim.violations == []
