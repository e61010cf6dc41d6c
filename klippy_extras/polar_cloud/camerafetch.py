# The camera's snapshot, fetched by the imaging child (imaging.py) with
# http.client: requests was 100 ms of CPU to import at every snapshot,
# with calls into C of several milliseconds that no pacer can cut
#
# The URL is the user's (snapshot_url: a LAN camera, or a camera
# service), so no address is refused here; imagingchild.fetch_spec chose
# the proxy (none for a LAN camera).  At most MAX_REDIRECTS redirects.
# Standard library only and no relative imports: imaging.py loads it by
# its path, in a child without the package.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import base64
import http.client
import socket
import ssl
import sys
import time
import urllib.parse
from typing import Any, Callable

MAX_REDIRECTS = 3
REDIRECT_CODES = (301, 302, 303, 307, 308)
TRUST_MODULE = "polar_cloud_trust"      # helperhost.Trust's CAs


class FetchFailed(Exception):
    """The text says why, for the console."""


def _context() -> ssl.SSLContext:
    """The CAs the helper host loaded (certifi's), else the system's."""
    trust = sys.modules.get(TRUST_MODULE)
    context = getattr(trust, "context", None)
    return context if context is not None else ssl.create_default_context()


def _connection(url: str, proxy: str, connect_timeout: float):
    """An unopened connection for url, through proxy if there is one, and
    the request's target."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchFailed("not an http(s) URL")
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    kind = http.client.HTTPSConnection if https else http.client.HTTPConnection
    options = {"context": _context()} if https else {}
    if not proxy:
        return kind(parts.hostname, port, timeout=connect_timeout,
                    **options), target, {}
    via = urllib.parse.urlsplit(proxy)
    auth = {}
    if via.username is not None:
        auth = {"Proxy-Authorization": "Basic " + base64.b64encode((
            "%s:%s" % (urllib.parse.unquote(via.username),
                       urllib.parse.unquote(via.password or ""))).encode(
                "utf-8")).decode("ascii")}
    conn = kind(via.hostname, via.port or 80, timeout=connect_timeout,
                **options)
    if https:
        conn.set_tunnel(parts.hostname, port, headers=auth)
        return conn, target, {}
    return conn, url, auth          # plain http: the proxy gets the URL


def _failure(exc: BaseException, connected: bool) -> str:
    refusal = str(exc).partition("Tunnel connection failed:")[2].strip()
    if refusal:                     # the proxy's answer to CONNECT
        return "the proxy refused (%s)" % (refusal[:60],)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "TLS failed (certificate verify failed)"
    if isinstance(exc, ssl.SSLError):
        return "TLS failed"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "no answer (%s timeout)" % ("read" if connected
                                           else "connect",)
    if isinstance(exc, http.client.IncompleteRead):
        return "incomplete answer"
    if isinstance(exc, OSError):
        return "connection failed"
    return exc.__class__.__name__


def fetch(spec: Any, pace: Callable[[], None]) -> bytes:
    """The whole answer to a GET of spec.url (imaging.Fetch: its
    timeouts, deadline, size limit and proxy), a frame's bytes; or
    FetchFailed."""
    deadline = time.monotonic() + spec.deadline
    too_big = spec.max_bytes >> 20
    url = spec.url
    for _ in range(MAX_REDIRECTS + 1):
        conn, target, headers = _connection(url, spec.proxy,
                                            spec.connect_timeout)
        connected = False
        try:
            conn.connect()
            connected = True
            conn.sock.settimeout(spec.read_timeout)
            conn.request("GET", target, headers=dict(
                headers, **{"Accept-Encoding": "identity"}))
            resp = conn.getresponse()
            location = resp.getheader("location")
            if resp.status in REDIRECT_CODES and location:
                url = urllib.parse.urljoin(url, location)
                continue
            if resp.status != 200:
                raise FetchFailed("HTTP %d" % (resp.status,))
            if (resp.getheader("content-type") or "").lower().startswith(
                    "multipart/"):
                raise FetchFailed("snapshot_url serves a video stream, not"
                                  " a snapshot")
            length = resp.getheader("content-length") or ""
            if length.isdigit() and int(length) > spec.max_bytes:
                raise FetchFailed("snapshot larger than %d MB" % (too_big,))
            buf = bytearray()
            while True:
                chunk = resp.read(spec.chunk)
                pace()
                if not chunk:
                    return bytes(buf)
                buf += chunk
                if len(buf) > spec.max_bytes:
                    raise FetchFailed("snapshot larger than %d MB; is"
                                      " snapshot_url a stream?" % (too_big,))
                if time.monotonic() > deadline:
                    raise FetchFailed("the camera is too slow")
        except (OSError, http.client.HTTPException) as e:
            raise FetchFailed(_failure(e, connected)) from None
        finally:
            conn.close()
    raise FetchFailed("too many redirects")
