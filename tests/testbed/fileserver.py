"""A tiny HTTP(S) file server for Download unit tests, on any loopback
address, with hostile behaviours.

    srv = FileServer(body, behaviour="drip_body", interval=0.2).start()
    srv.url("/x.gcode")            # http://127.0.0.1:PORT/x.gcode
    srv.dripping.wait(10)          # the first dripped byte went out
    srv.client_gone.wait(10)       # the client closed its end
    srv.requests                   # [{"path", "host", "sni"}, ...]

Behaviours:
  ok           200 with the body
  drip_body    full headers (Content-Length: body + 1 MB), then one byte
               of the body per `interval`, until the client goes away
  drip_headers the status line, then one byte of a header per `interval`
`redirects` ({path: location}) answers those paths with a 302 first;
`headers` keeps each request's headers (lower-case names).
TLS: pass `cert` (a make_certs() entry); the SNI the client sent is
recorded.  Threaded and blocking, like tlsproxy.
"""

from __future__ import annotations

import socket
import ssl
import threading
from typing import Optional

from tests.testbed.servers import TcpServer


class FileServer(TcpServer):
    thread_name = "fileserver"

    def __init__(self, body: bytes = b"G28\n", behaviour: str = "ok",
                 interval: float = 0.2, host: str = "127.0.0.1",
                 port: int = 0, cert: Optional[dict] = None,
                 redirects: Optional[dict[str, str]] = None) -> None:
        super().__init__(host, port)
        self.redirects = dict(redirects or {})
        self.headers: list[dict] = []
        self.body = body
        self.behaviour = behaviour
        self.interval = interval
        self.requests: list[dict] = []
        self.connections = 0
        self.dripping = threading.Event()
        self.client_gone = threading.Event()
        self._lock = threading.Lock()
        self._ctx = None
        if cert is not None:
            self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._ctx.load_cert_chain(cert["cert"], cert["key"])
            self._ctx.sni_callback = self._note_sni
        self._sni = threading.local()    # the handshake runs on the
        #                                  connection's own thread

    def url(self, path: str = "/x.gcode", host: Optional[str] = None) -> str:
        scheme = "https" if self._ctx is not None else "http"
        return "%s://%s:%d%s" % (scheme, host or self.host, self.port, path)

    def _note_sni(self, _sslobj, name, _ctx) -> None:
        self._sni.name = name

    def accepted(self) -> None:
        with self._lock:
            self.connections += 1

    def handle(self, conn: socket.socket) -> None:
        sni = None
        try:
            conn.settimeout(10)
            if self._ctx is not None:
                self._sni.name = None
                conn = self._ctx.wrap_socket(conn, server_side=True)
                sni = self._sni.name
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(4096)
                if not data:
                    return
                head += data
            length, path = self._record(head, sni)
            # A request's body (an upload's form) is read, then dropped
            body = len(head) - head.index(b"\r\n\r\n") - 4
            while body < length:
                data = conn.recv(65536)
                if not data:
                    return
                body += len(data)
            if path in self.redirects:
                conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: %s\r\n"
                             b"Content-Length: 0\r\nConnection: close\r\n\r\n"
                             % (self.redirects[path].encode(),))
                return
            self._respond(conn)
        except (OSError, ssl.SSLError):
            self.client_gone.set()
        finally:
            conn.close()

    def _record(self, head: bytes, sni: Optional[str]) -> tuple[int, str]:
        """The request noted; its body's length and its path."""
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        path = lines[0].split(" ")[1]
        with self._lock:
            self.requests.append({"path": path, "host": headers.get("host"),
                                  "sni": sni})
            self.headers.append(headers)
        length = headers.get("content-length", "")
        return (int(length) if length.isdigit() else 0), path

    def _respond(self, conn: socket.socket) -> None:
        if self.behaviour == "ok":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%s"
                         % (len(self.body), self.body))
            return
        if self.behaviour == "drip_body":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
                         % (len(self.body) + (1 << 20),))
            drip = self.body * (1 << 20)
        else:
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            drip = b"X-Drip: " + b"a" * (1 << 20)
        for i in range(len(drip)):
            # The pace of a hostile server, not a synchronisation
            if self.stopping.wait(self.interval if i else 0):
                return
            conn.sendall(drip[i:i + 1])
            self.dripping.set()
