# How the module reaches the network: proxies, and the URLs it accepts
#
# Schools and companies often let the internet through an HTTP proxy
# only, set for services in the environment as HTTPS_PROXY (and
# HTTP_PROXY, NO_PROXY; upper or lower case, lower case first, as Python's
# urllib reads them).  Every outbound connection asks proxy_for() here:
# the Socket.IO link (link.py), job downloads (jobs.py), snapshot uploads
# and the webcam fetch (camera.py, imaging.py).  Loopback and LAN
# addresses never go through a proxy.  The URLs the cloud sends for
# downloads and uploads must name public addresses (check_url, and
# refused_address once resolved), and a direct connection goes to the
# address checked (pinned.py).
# Through a proxy the proxy resolves the destination's name; the module
# does no lookup of its own for it.
#
# A proxy's credentials are secrets: logs, the console and get_status
# only ever show Proxy.shown (scheme, host and port).
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import http
import ipaddress
import logging
import re
import socket
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Optional

DEFAULT_PROXY_PORT = 80
# Names a proxy cannot know: this host and the LAN's multicast DNS
LOCAL_SUFFIXES = (".localhost", ".local")
TUNNEL_STATUS_RES = (
    # http.client (urllib3, requests): "Tunnel connection failed: 403 Forbidden"
    re.compile(r"Tunnel connection failed: (\d{3})(?: ([^'\"()\\]*))?"),
    # websocket-client: "failed CONNECT via proxy status: 403"
    re.compile(r"CONNECT via proxy status: (\d{3})()"),
)


# Not public although Python's ipaddress does not call them private
SHARED_NETS = (ipaddress.ip_network("100.64.0.0/10"),)  # carrier-grade NAT,
#                                                         Tailscale


class ProxyError(ValueError):
    """The proxy setting in the environment cannot be used."""


@dataclass(frozen=True)
class Proxy:
    """An HTTP proxy (CONNECT tunnels).  repr() hides the password."""
    host: str
    port: int
    username: str = ""
    password: str = field(default="", repr=False)
    @property
    def address(self) -> str:
        """host:port, for get_status."""
        host = "[%s]" % (self.host,) if ":" in self.host else self.host
        return "%s:%d" % (host, self.port)
    @property
    def shown(self) -> str:
        """http://host:port: never the credentials."""
        return "http://" + self.address
    @property
    def url(self) -> str:
        """The full URL, credentials included (for requests only)."""
        auth = ""
        if self.username or self.password:
            auth = "%s:%s@" % (urllib.parse.quote(self.username, safe=""),
                               urllib.parse.quote(self.password, safe=""))
        return "http://%s%s" % (auth, self.address)
    def basic_auth(self) -> Optional[str]:
        """user:password for a Proxy-Authorization header, or None."""
        if not self.username and not self.password:
            return None
        return "%s:%s" % (self.username, self.password)


def _without_credentials(value: str) -> str:
    return re.sub(r"//[^/@]*@", "//", value)[:80]


def parse_proxy(value: str) -> Proxy:
    """A proxy URL from the environment ("http://[user:pw@]host[:port]",
    or just "host:port"); raises ProxyError."""
    value = value.strip()
    text = value if "://" in value else "http://" + value
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError:
        raise ProxyError("not a proxy URL: %s"
                         % (_without_credentials(value),)) from None
    if parts.scheme.lower() != "http":
        raise ProxyError("only http:// proxies are supported, not %s"
                         % (_without_credentials(value),))
    if not parts.hostname:
        raise ProxyError("not a proxy URL: %s"
                         % (_without_credentials(value),))
    return Proxy(parts.hostname, port or DEFAULT_PROXY_PORT,
                 urllib.parse.unquote(parts.username or ""),
                 urllib.parse.unquote(parts.password or ""))


def is_local_host(host: str) -> bool:
    """This host or the LAN: never through a proxy."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(LOCAL_SUFFIXES):
        return True
    try:
        return not ipaddress.ip_address(host).is_global
    except ValueError:
        return False


def _bypassed(host: str, no_proxy: str) -> bool:
    """NO_PROXY as urllib reads it (names match themselves and their
    subdomains, a leading dot is ignored, '*' matches everything), plus
    address ranges ("203.0.113.0/24") for literal addresses."""
    if not no_proxy:
        return False
    if urllib.request.proxy_bypass_environment(host, {"no": no_proxy}):
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    for entry in no_proxy.split(","):
        try:
            if addr in ipaddress.ip_network(entry.strip(), strict=False):
                return True
        except ValueError:
            continue
    return False


def proxy_for(url: str) -> Optional[Proxy]:
    """The proxy to reach url through, None to connect directly; raises
    ProxyError when the environment names a proxy that cannot be used."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if not host or is_local_host(host):
        return None
    scheme = {"wss": "https", "ws": "http"}.get(parts.scheme, parts.scheme)
    proxies = urllib.request.getproxies_environment()
    value = proxies.get(scheme)
    if not value or _bypassed(host, proxies.get("no", "")):
        return None
    try:
        return parse_proxy(value)
    except ProxyError as e:
        raise ProxyError("%s_PROXY: %s" % (scheme.upper(), e)) from None


def shown_proxy(proxy: Optional[Proxy]) -> str:
    """http://host:port, or "" without a proxy."""
    return proxy.shown if proxy is not None else ""


def _reasons(exc: BaseException):
    """exc and what it wraps: causes, contexts, and the exceptions urllib3
    and requests keep in their arguments or in .reason."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo and len(seen) < 16:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        inner = [e.__cause__, e.__context__, getattr(e, "reason", None)]
        inner += list(getattr(e, "args", ()))
        todo += [i for i in inner if isinstance(i, BaseException)]


def failure_reason(exc: BaseException) -> str:
    """Why a connection through a proxy failed, in a few words: the
    proxy's answer to CONNECT ("403 Forbidden") when there was one; ""
    when exc tells nothing about the proxy."""
    chain = list(_reasons(exc))
    for e in chain:
        for pattern in TUNNEL_STATUS_RES:
            match = pattern.search(str(e))
            if match:
                code = int(match.group(1))
                phrase = (match.group(2) or "").strip()
                if not phrase:
                    try:
                        phrase = http.HTTPStatus(code).phrase
                    except ValueError:
                        phrase = ""
                return ("%d %s" % (code, phrase)).strip()[:80]
    for e in chain:
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, socket.gaierror):
            return "cannot resolve the proxy's name"
        if isinstance(e, (socket.timeout, TimeoutError)) \
                or e.__class__.__name__ in ("ConnectTimeoutError",
                                            "ReadTimeoutError",
                                            "ConnectTimeout", "ReadTimeout"):
            return "timed out"
        if isinstance(e, ConnectionResetError):
            return "connection reset"
    return ""


def proxy_failure(host: str, proxy: Proxy, exc: BaseException) -> str:
    """The error text for a connection through a proxy."""
    return "cannot reach %s through proxy %s: %s" % (
        host, proxy.shown, failure_reason(exc) or exc.__class__.__name__)


# URLs the cloud sends: downloads and uploads

def _address_is_public(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    if ip.version == 4 and any(ip in net for net in SHARED_NETS):
        return False
    return not (ip.is_private or ip.is_loopback or ip.is_link_local
                or ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str, allow_loopback_http: bool) -> str:
    """Return an error text for a download URL the policy refuses."""
    try:
        parts = urllib.parse.urlsplit(url)
        _port = parts.port             # raises for a port out of range
    except ValueError:
        return "not a URL"
    host = parts.hostname or ""
    if not host or parts.username or parts.password:
        return "not an acceptable URL"
    loopback = is_loopback_host(host)
    if parts.scheme == "http" and not (allow_loopback_http and loopback):
        return "plain http is not allowed"
    if parts.scheme not in ("http", "https"):
        return "only https downloads are allowed"
    if loopback and not allow_loopback_http:
        return "the address is not public"
    try:
        if not loopback and not _address_is_public(host):
            return "the address is not public"
    except ValueError:
        pass
    return ""


Address = tuple[int, tuple]        # (family, sockaddr)


def resolve(host: str, port: int) -> list[Address]:
    """Every address of host, from one lookup."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [(family, sockaddr) for family, _t, _p, _c, sockaddr in infos]


def refused_address(addresses: list[Address], allow_loopback: bool) -> str:
    """Error text when any of a name's addresses is not allowed."""
    if not addresses:
        return "the name has no address"
    for _family, sockaddr in addresses:
        addr = sockaddr[0]
        if allow_loopback and ipaddress.ip_address(addr).is_loopback:
            continue
        if not _address_is_public(addr):
            return "the address is not public"
    return ""


# Signed URLs carry a secret in their query

URL_QUERY_RE = re.compile(r"\?[^\s\"'<>]*")
URLLIB3_LOGGERS = ("urllib3", "urllib3.connectionpool", "urllib3.connection",
                   "urllib3.poolmanager", "urllib3.response",
                   "urllib3.util.retry")


class HideUrlQueries(logging.Filter):
    """A signed URL carries its secret in the query: urllib3's debug lines
    (verbose) keep the path only."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:
            return True
        if "?" in text:
            record.msg = URL_QUERY_RE.sub("?...", text)
            record.args = None
        return True


def hide_url_queries() -> None:
    """Install HideUrlQueries on urllib3's loggers (a logger's filter sees
    only its own records, not its children's)."""
    for name in URLLIB3_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, HideUrlQueries) for f in logger.filters):
            logger.addFilter(HideUrlQueries())
