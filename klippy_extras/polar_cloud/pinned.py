# HTTP(S) connections to checked addresses only, for the helpers that
# download jobs (fetcher.py) and upload files (uploads.post_form)
#
# The name in a URL the cloud sends is looked up once; every address is
# checked (netpolicy.refused_address: no private, loopback or link-local
# address), and the connection goes to one of those, never to a second
# lookup's answer (DNS rebinding).  The Host header, SNI and the
# certificate check still use the name.  Through a proxy (the
# administrator's choice: a LAN address is fine) the connection is a
# CONNECT tunnel, and the proxy resolves the name.  http.client, not
# requests: requests is 100 ms of CPU to import in each helper.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import base64
import socket
import ssl
import urllib.parse
from typing import Optional

from . import netpolicy

CONNECT_TIMEOUT = 15.
DEFAULT_PORTS = {"http": 80, "https": 443}
Address = netpolicy.Address


class Unreachable(Exception):
    """No connection: refused by the policy (refused=True: the text says
    why) or a failed lookup; the text is for the console."""

    def __init__(self, text: str, refused: bool = False):
        super().__init__(text)
        self.refused = refused


def connect(addresses: list[Address], timeout: float) -> socket.socket:
    """A connection to the first of the checked addresses that answers."""
    error: OSError = OSError("no address to connect to")
    for family, sockaddr in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            error = e
        except BaseException:
            sock.close()
            raise
    raise error


def connection_class(https: bool, read_timeout: float):
    """http.client connections to the checked addresses only: the
    destination's, or the proxy's with a CONNECT tunnel through it
    (imported late: klippy loads this module too, for its types)."""
    import http.client

    base = http.client.HTTPSConnection if https else http.client.HTTPConnection

    class PinnedConnection(base):
        # The name stays the host (directly) or the tunnel's host: the
        # Host header, SNI and the certificate check use it; only the
        # peer address is pinned
        def __init__(self, host, port, addresses, **kw):
            super().__init__(host, port, timeout=CONNECT_TIMEOUT, **kw)
            self.addresses = addresses
            self.reached = False        # the destination, not the proxy
        def connect(self):
            self.sock = connect(self.addresses, CONNECT_TIMEOUT)
            if self._tunnel_host:
                self._tunnel()
            self.reached = True
            if https:
                self.sock = self._context.wrap_socket(
                    self.sock, server_hostname=self._tunnel_host or self.host)
            self.sock.settimeout(read_timeout)
    return PinnedConnection


def request_target(parts: urllib.parse.SplitResult) -> str:
    return (parts.path or "/") + ("?" + parts.query if parts.query else "")


def checked_addresses(host: str, port: int,
                      allow_loopback: bool) -> list[Address]:
    """One lookup, every address checked."""
    try:
        addresses = netpolicy.resolve(host, port)
    except OSError as e:
        raise Unreachable("cannot resolve %s: %s" % (host, e)) from e
    problem = netpolicy.refused_address(addresses, allow_loopback)
    if problem:
        raise Unreachable(problem, refused=True)
    return addresses


def proxy_addresses(host: str, proxy: netpolicy.Proxy) -> list[Address]:
    """The proxy's addresses, from one lookup."""
    try:
        return netpolicy.resolve(proxy.host, proxy.port)
    except OSError as e:
        raise Unreachable(netpolicy.proxy_failure(host, proxy, e)) from e


def connection(parts: urllib.parse.SplitResult,
               proxy: Optional[netpolicy.Proxy], allow_loopback: bool,
               context: Optional[ssl.SSLContext], read_timeout: float):
    """An unopened connection for the URL's parts: to its host's checked
    addresses, or through the proxy's tunnel (context: for https)."""
    https = parts.scheme == "https"
    options = {"context": context} if https else {}
    port = parts.port or DEFAULT_PORTS[parts.scheme]
    if proxy is None:
        return connection_class(https, read_timeout)(
            parts.hostname, port,
            checked_addresses(parts.hostname, port, allow_loopback),
            **options)
    conn = connection_class(https, read_timeout)(
        proxy.host, proxy.port, proxy_addresses(parts.hostname, proxy),
        **options)
    auth = proxy.basic_auth()
    conn.set_tunnel(parts.hostname, port, headers={
        "Proxy-Authorization": "Basic " + base64.b64encode(
            auth.encode("utf-8")).decode("ascii")} if auth else None)
    return conn


def failure(exc: BaseException) -> str:
    """Why a request on such a connection failed, in a few plain words."""
    import http.client
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "TLS failed (certificate verify failed)"
    if isinstance(exc, ssl.SSLError):
        return "TLS failed"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "no answer (timeout)"
    if isinstance(exc, http.client.IncompleteRead):
        return "incomplete answer"
    if isinstance(exc, OSError):
        return "connection failed"
    return exc.__class__.__name__
