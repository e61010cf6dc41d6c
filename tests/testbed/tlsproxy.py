"""A TLS terminator on loopback in front of the cloud simulator, and the
certificates to test TLS verification with.

    certs = make_certs(tmp_path)            # CA + leaf certificates
    tls = TlsProxy(("127.0.0.1", sim.port), certs["good"]).start()
    tls.url                                 # https://127.0.0.1:PORT
    tls.use(certs["expired"])               # serve another certificate
    tls.handshakes, tls.failures            # what the printer tried

Certificates (ECDSA P-256, made with `cryptography`):
  ca           a private CA ("Polar Test Root CA"), not in any system store
  good         signed by the CA, valid now, for 127.0.0.1 and localhost
  expired      signed by the CA, for 127.0.0.1, expired a year ago
  wrong_host   signed by the CA, valid now, only for polar.example.com
  self_signed  its own issuer, for 127.0.0.1
  named        signed by the CA, valid now, for the names given as
               make_certs(tmp_path, names=[...]) (only then)
Each value is a dict with "cert" and "key" paths (the CA: "cert" only
matters, as a ca_file).
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
from pathlib import Path
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.testbed.servers import TcpServer


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(dirname: Path, stem: str, cert: x509.Certificate,
           key: ec.EllipticCurvePrivateKey) -> dict[str, str]:
    cert_path = dirname / ("%s.pem" % (stem,))
    key_path = dirname / ("%s.key" % (stem,))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return {"cert": str(cert_path), "key": str(key_path)}


def make_certs(dirname: Path,
               names: Optional[list[str]] = None) -> dict[str, dict[str, str]]:
    dirname = Path(dirname)
    dirname.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("Polar Test Root CA"))
        .issuer_name(_name("Polar Test Root CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - day).not_valid_after(now + 365 * day)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                       critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(
            ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256()))
    out = {"ca": _write(dirname, "ca", ca_cert, ca_key)}

    def leaf(stem: str, names: list[str], start: datetime.datetime,
             end: datetime.datetime, self_signed: bool = False) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(_name(names[0]) if self_signed
                         else ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
        if not self_signed:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    ca_key.public_key()), critical=False)
        cert = builder.sign(key if self_signed else ca_key, hashes.SHA256())
        out[stem] = _write(dirname, stem, cert, key)

    leaf("good", ["127.0.0.1", "localhost"], now - day, now + 30 * day)
    leaf("expired", ["127.0.0.1", "localhost"], now - 400 * day,
         now - 365 * day)
    leaf("wrong_host", ["polar.example.com"], now - day, now + 30 * day)
    leaf("self_signed", ["127.0.0.1", "localhost"], now - day,
         now + 30 * day, self_signed=True)
    if names:
        leaf("named", list(names), now - day, now + 30 * day)
    return out


class TlsProxy(TcpServer):
    """Terminates TLS with a chosen certificate and forwards plain TCP.

    Threaded and blocking on purpose: the handshake runs on the accepted
    socket before anything is read, so no byte of a ClientHello can be
    lost, and every attempt (failed handshakes too) is counted."""

    backlog = 64
    thread_name = "tlsproxy"

    def __init__(self, target: tuple[str, int], cert: dict[str, str],
                 host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self.target = target
        self.handshakes = 0          # TCP connections that started TLS
        self.failures = 0            # ... whose handshake failed
        self.established = 0
        self._ctx = self._context(cert)
        self._lock = threading.Lock()
        self._socks: set = set()

    @staticmethod
    def _context(cert: dict[str, str]) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert["cert"], cert["key"])
        return ctx

    @property
    def url(self) -> str:
        return "https://%s:%d" % (self.host, self.port)

    def use(self, cert: dict[str, str]) -> None:
        ctx = self._context(cert)
        with self._lock:
            self._ctx = ctx

    def counts(self) -> tuple[int, int, int]:
        """(handshakes, failures, established) so far."""
        with self._lock:
            return self.handshakes, self.failures, self.established

    def stop(self) -> None:
        super().stop()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.close()
            except OSError:
                pass

    def handle(self, conn: socket.socket) -> None:
        with self._lock:
            self.handshakes += 1
            ctx = self._ctx
        conn.settimeout(20)
        try:
            tls = ctx.wrap_socket(conn, server_side=True)
        except (OSError, ssl.SSLError):
            with self._lock:
                self.failures += 1
            conn.close()
            return
        with self._lock:
            self.established += 1
        try:
            up = socket.create_connection(self.target, timeout=10)
        except OSError:
            tls.close()
            return
        tls.settimeout(None)
        up.settimeout(None)
        with self._lock:
            self._socks.update((tls, up))
        t = threading.Thread(target=self._pipe, args=(up, tls), daemon=True,
                             name="tlsproxy-down")
        t.start()
        self._pipe(tls, up)
        t.join(30)
        with self._lock:
            self._socks.difference_update((tls, up))

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except (OSError, ssl.SSLError):
            pass
        for s in (dst, src):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
