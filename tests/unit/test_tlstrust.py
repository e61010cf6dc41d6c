"""tlstrust.py: the CAs a download or an upload trusts, loaded paced, or
taken from the helper host's (helperhost.Trust) in a helper child."""
import socket
import ssl
import types

import pytest

from klippy_extras.polar_cloud import tlstrust
from tests.testbed.fileserver import FileServer
from tests.testbed.tlsproxy import make_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


def serial_numbers(ctx: ssl.SSLContext) -> set:
    return {c["serialNumber"] for c in ctx.get_ca_certs()}


def handshake(ctx: ssl.SSLContext, cert) -> str:
    with FileServer(b"ok", cert=cert) as srv, \
            socket.create_connection(("127.0.0.1", srv.port)) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        return tls.version()


def test_a_paced_tls_context_trusts_the_same_cas(certs, tmp_path_factory):
    calls = []
    paced = tlstrust.tls_context(certs["ca"]["cert"], lambda: calls.append(1))
    whole = tlstrust.tls_context(certs["ca"]["cert"])
    names = [{c["serialNumber"] for c in ctx.get_ca_certs()}
             for ctx in (paced, whole)]
    assert names[0] == names[1] and len(names[0]) > 50
    # A few certificates at a time, the pacer called after each few
    assert len(calls) >= len(names[0]) // tlstrust.CERTS_AT_ONCE
    assert paced.verify_mode == ssl.CERT_REQUIRED and paced.check_hostname
    with FileServer(b"ok", cert=certs["good"]) as srv, \
            socket.create_connection(("127.0.0.1", srv.port)) as raw, \
            paced.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        assert tls.version()
    not_pem = tmp_path_factory.mktemp("bad") / "ca.pem"
    not_pem.write_text("no certificate here\n")
    with pytest.raises(ssl.SSLError):
        tlstrust.tls_context(str(not_pem), lambda: None)


def host_trust_module(bundle: str) -> types.ModuleType:
    """What helperhost.Trust leaves in sys.modules, from bundle."""
    module = types.ModuleType(tlstrust.TRUST_MODULE)
    module.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    module.context.load_verify_locations(cafile=bundle)
    module.bundle = bundle
    return module


def test_a_helper_takes_its_hosts_cas_and_adds_ca_file(certs, monkeypatch):
    trust = host_trust_module(tlstrust.default_ca_certs())
    monkeypatch.setitem(tlstrust.sys.modules, tlstrust.TRUST_MODULE, trust)
    bundle_only = serial_numbers(trust.context)
    calls = []
    ctx = tlstrust.tls_context(certs["ca"]["cert"], lambda: calls.append(1))
    assert ctx is trust.context and calls == []     # nothing loaded again
    assert len(serial_numbers(ctx) - bundle_only) == 1      # ca_file's CA
    assert handshake(ctx, certs["good"])
    # Asked again (a redirect's new connection): the same CAs
    assert tlstrust.tls_context(certs["ca"]["cert"], lambda: None) is ctx
    assert serial_numbers(ctx) - bundle_only != set()


def test_a_host_context_from_another_bundle_is_not_taken(certs, monkeypatch):
    trust = host_trust_module(certs["ca"]["cert"])
    monkeypatch.setitem(tlstrust.sys.modules, tlstrust.TRUST_MODULE, trust)
    ctx = tlstrust.tls_context("", lambda: None)
    assert ctx is not trust.context and len(serial_numbers(ctx)) > 50
    # Not complete yet (a helper forked while the host was loading it)
    trust.context, trust.bundle = None, tlstrust.default_ca_certs()
    assert tlstrust.tls_context("", lambda: None) is not None


def test_the_bundle_is_certifis_found_without_importing_it():
    import certifi
    assert tlstrust.default_ca_certs() == certifi.where()
