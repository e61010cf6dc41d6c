# The certificates a download or an upload trusts: requests' CA bundle
# (certifi's), and ca_file's CAs besides (a private cloud, a
# TLS-inspecting proxy).  In a helper child the bundle is the one its
# helper host loaded before the fork (helperhost.Trust); elsewhere it is
# loaded here, a few certificates at a time when paced.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import importlib.util
import os
import re
import ssl
import sys
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from .netpolicy import Proxy

PEM_CERT_RE = re.compile(
    r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
CERTS_AT_ONCE = 4
TRUST_MODULE = "polar_cloud_trust"      # helperhost.py's


def default_ca_certs() -> str:
    """requests' CA bundle (certifi's), without importing requests, or
    certifi when its cacert.pem is where it always is."""
    spec = importlib.util.find_spec("certifi")
    for folder in (spec and spec.submodule_search_locations) or ():
        path = os.path.join(folder, "cacert.pem")
        if os.path.isfile(path):
            return path
    try:
        import certifi
    except ImportError:
        from requests.certs import where
        return where()
    return certifi.where()


def host_trust(ca_file: str) -> Optional[ssl.SSLContext]:
    """In a helper child: the CA bundle's TLS context its helper host
    loaded before the fork (helperhost.Trust), with ca_file's CAs added;
    None elsewhere, or if it was loaded from another bundle."""
    trust = sys.modules.get(TRUST_MODULE)
    context = getattr(trust, "context", None)
    if context is None or trust.bundle != default_ca_certs():
        return None
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


def tls_context(ca_file: str = "",
                pace: Optional[Callable[[], None]] = None) -> ssl.SSLContext:
    """Verifying TLS for downloads and uploads: the usual CA bundle, and
    the CAs in ca_file too (a private cloud, a TLS-inspecting proxy).

    With pace (a helper child's pacer) the CAs are loaded a few at a
    time, paced between: the bundle at once is about 20 ms of CPU in one
    call, which under a CPU quota is klippy's share of several periods."""
    if pace is None:
        ctx = ssl.create_default_context(cafile=default_ca_certs())
        if ca_file:
            ctx.load_verify_locations(cafile=ca_file)
        return ctx
    ctx = host_trust(ca_file)
    if ctx is not None:
        return ctx
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)     # verifies host and chain
    for path in filter(None, (default_ca_certs(), ca_file)):
        with open(path, encoding="ascii", errors="replace") as f:
            certs = PEM_CERT_RE.findall(f.read())
        if not certs:           # its own error, or DER
            ctx.load_verify_locations(cafile=path)
        for i in range(0, len(certs), CERTS_AT_ONCE):
            ctx.load_verify_locations(
                cadata="\n".join(certs[i:i + CERTS_AT_ONCE]))
            pace()
    return ctx


def requests_session(proxy: Optional[Proxy], ca_file: str = ""):
    """A requests Session that goes through proxy (or directly: the
    environment is not read again) and trusts ca_file besides the usual
    CAs (makes.py, on a thread of klippy's)."""
    import requests
    from requests.adapters import HTTPAdapter

    class TrustingAdapter(HTTPAdapter):
        # requests' documented way to verify with an SSLContext of one's own
        context = tls_context(ca_file) if ca_file else None
        def build_connection_pool_key_attributes(self, request, verify,
                                                 cert=None):
            host, pool = super().build_connection_pool_key_attributes(
                request, verify, cert)
            pool["ssl_context"] = self.context
            return host, pool

    http_session = requests.Session()
    http_session.trust_env = False
    if proxy is not None:
        http_session.proxies = {"http": proxy.url, "https": proxy.url}
    if ca_file:
        http_session.mount("https://", TrustingAdapter())
    return http_session
