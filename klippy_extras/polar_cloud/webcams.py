# The webcam as Mainsail knows it: Moonraker's webcam list
#
# With `webcam: <name>`, the camera's snapshot URL, stream URL, flips and
# rotation come from Moonraker (GET /server/webcams/list on
# moonraker_url), read at start and again on every connection to Polar
# Cloud; options set in [polar_cloud] still win.  The lookup runs on a
# worker thread, never on klippy's reactor; the session thread applies
# its result.  A missing Moonraker or camera gives one clear line, and
# the [polar_cloud] camera options stay in use.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
import time
from typing import Any, Optional, Union

from . import protocol
from .httpget import get_body
from .options import (
    ROTATIONS,
    CameraOptions,
    WebcamOptions,
    check_snapshot_url,
    check_stream_url,
)
from .worker import Worker, contained

log = logging.getLogger("polar_cloud")

LIST_PATH = "/server/webcams/list"
TIMEOUT = (3., 5.)
MAX_BYTES = 512 * 1024
# Moonraker not answering yet (klippy came up first): look again after
RETRIES = (10., 30., 60., 120.)
# Where Moonraker puts a snapshot URL that is only a path (nginx)
LOCAL_HOST = "http://127.0.0.1"


# Pure helpers

def fetch_list(moonraker_url: str) -> list:
    """Moonraker's webcams (worker thread); raises LookupError."""
    import requests
    try:
        with requests.Session() as http:
            http.trust_env = False
            body = get_body(http, moonraker_url + LIST_PATH, TIMEOUT,
                            MAX_BYTES, "the webcam list")
    except requests.ConnectionError:
        raise LookupError("Moonraker does not answer") from None
    except requests.RequestException as e:
        raise LookupError(e.__class__.__name__) from None
    except ValueError as e:
        raise LookupError(str(e)) from None
    try:
        webcams = json.loads(body)["result"]["webcams"]
    except (ValueError, KeyError, TypeError):
        raise LookupError("not a webcam list") from None
    if not isinstance(webcams, list):
        raise LookupError("not a webcam list")
    return [w for w in webcams if isinstance(w, dict)]


def find(webcams: list, name: str) -> Optional[dict]:
    """The webcam named so (exactly, else ignoring case)."""
    for exact in (True, False):
        for cam in webcams:
            other = cam.get("name")
            if isinstance(other, str) and (
                    other == name if exact else other.lower() == name.lower()):
                return cam
    return None


def names(webcams: list) -> str:
    found = [c["name"] for c in webcams if isinstance(c.get("name"), str)]
    return ", ".join("'%s'" % (n[:64],) for n in found[:10]) or "none"


def absolute(url: str) -> str:
    """A snapshot URL Moonraker holds as a path is served by the web
    server on this host, as Moonraker itself reads it."""
    if url and not re.match(r"^\w+://", url):
        return "%s/%s" % (LOCAL_HOST, url.lstrip("/"))
    return url


def camera_options(base: CameraOptions,
                   cam: dict) -> tuple[CameraOptions, list[str]]:
    """base with the webcam's settings where printer.cfg sets none, and
    what could not be used."""
    changes: dict[str, Any] = {}
    problems = []
    explicit = base.explicit
    snapshot = cam.get("snapshot_url")
    if "snapshot_url" not in explicit:
        snapshot = absolute(snapshot) if isinstance(snapshot, str) else ""
        if snapshot and not check_snapshot_url(snapshot):
            changes["snapshot_url"] = snapshot
        else:
            problems.append("no usable snapshot URL")
    stream = cam.get("stream_url")
    if "stream_url" not in explicit and isinstance(stream, str) \
            and not check_stream_url(stream):
        changes["stream_url"] = stream
    for option in ("flip_horizontal", "flip_vertical"):
        if option not in explicit and isinstance(cam.get(option), bool):
            changes[option] = cam[option]
    rotation = cam.get("rotation")
    if "rotation" not in explicit and not isinstance(rotation, bool):
        if rotation in ROTATIONS.values():
            changes["rotation"] = rotation
        elif rotation is not None:
            problems.append("rotation %.10r is not 0, 90, 180 or 270"
                            % (rotation,))
    return dataclasses.replace(base, **changes), problems


# The session's side

class Webcams:
    def __init__(self, session):
        self.session = session
        self.opts: WebcamOptions = session.options.webcam
        self.base: CameraOptions = session.options.camera
        self.worker = Worker("polar_cloud-webcams", session.stop_event)
        self.wake = threading.Event()   # a retry waiting goes at once
        self.found = False              # the webcam was read at least once
        self.problem = ""
        self.logged = ""
    @contained()
    def refresh(self) -> None:
        """At start and on every connection (session thread)."""
        if not self.opts.name:
            return
        if self.worker.busy():
            self.wake.set()
            return
        self.session.camera.hold(True)
        self._submit(0., 0)
    @contained("")
    def describe(self) -> str:
        cam = self.session.camera
        opts = cam.opts
        if opts.enabled is False:
            return "off (webcam_enabled: False)"
        if self.found:
            text = "Mainsail's webcam '%s'" % (self.opts.name,)
        else:
            text = "snapshot_url"
        text += " (%s" % (cam.where,)
        if opts.rotation or opts.flip_horizontal or opts.flip_vertical:
            text += ", %s" % (", ".join(
                (["rotation %d" % (opts.rotation,)] if opts.rotation else [])
                + (["flipped horizontally"] if opts.flip_horizontal else [])
                + (["flipped vertically"] if opts.flip_vertical else [])),)
        if cam.available() is False:
            text += ", not answering"
        text += ")"
        if self.problem:
            text += "; Mainsail's webcam '%s': %s" % (self.opts.name,
                                                      self.problem)
        return text
    @contained()
    def stop(self, timeout: float) -> None:
        self.wake.set()
        self.worker.join(timeout)
    def _submit(self, delay: float, attempt: int) -> None:
        self.wake.clear()
        if not self.worker.submit(self._lookup, delay, done=lambda result: (
                self.session.post(self._apply, result, attempt))):
            self.session.camera.hold(False)
    def _lookup(self, delay: float) -> Union[list, str, None]:
        """Worker thread: the webcam list, or why not."""
        if delay:
            self.wake.wait(delay)
            if self.session.stop_event.is_set():
                return None
        try:
            return fetch_list(self.opts.moonraker_url)
        except LookupError as e:
            return str(e)
    @contained()
    def _apply(self, result: Union[list, str, None], attempt: int) -> None:
        """Session thread."""
        camera = self.session.camera
        camera.hold(False)
        if result is None:
            return
        name = self.opts.name
        if isinstance(result, str):
            problem = "%s at %s" % (result, self.opts.moonraker_url)
            if not self.found and attempt < len(RETRIES) \
                    and "does not answer" in result:
                self._submit(RETRIES[attempt], attempt + 1)
        else:
            cam = find(result, name)
            if cam is None:
                problem = "Moonraker has no webcam of that name (it has %s)" \
                    % (names(result),)
            else:
                opts, problems = camera_options(self.base, cam)
                problem = "; ".join(problems)
                self.found = True
                if opts != camera.opts:
                    camera.set_options(opts)
                    now = time.monotonic()
                    if camera.due("idle", now):
                        # Does it answer? (the hello waits to say so)
                        camera.start("idle", protocol.NO_JOB_ID, now)
                    log.info("polar_cloud: using Mainsail's webcam '%s':"
                             " snapshots from %s, rotation %d%s%s", name,
                             camera.where, opts.rotation,
                             ", flipped horizontally"
                             if opts.flip_horizontal else "",
                             ", flipped vertically"
                             if opts.flip_vertical else "")
        self.problem = problem
        if problem and problem != self.logged:
            kept = "the last settings read" if self.found \
                else "the [polar_cloud] camera options"
            log.warning("polar_cloud: cannot use Mainsail's webcam '%s': %s;"
                        " using %s", name, problem, kept)
            self.session.console("Polar Cloud: cannot use Mainsail's webcam"
                                 " '%s': %s; using %s" % (name, problem, kept),
                                 error=True, log=False)
        self.logged = problem
        self.session.publish()
