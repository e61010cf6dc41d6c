"""Squid (Debian's) on loopback: the HTTPS proxy a school network has.

    px = ProxyServer(hosts=["cloud.polar.test", "blocked.polar.test"],
                     allow={"cloud.polar.test": [443]},
                     users={"pcuser": "pc-secret"}).start()
    px.url                      # http://127.0.0.1:PORT
    px.url_with("pcuser")       # http://pcuser:pc-secret@127.0.0.1:PORT
    px.log()                    # [("CONNECT", "cloud.polar.test:443", 200)]
    px.stop()

`hosts` resolve to 127.0.0.1 for squid only (its own hosts_file); this
machine cannot resolve them, so whatever reaches them went through the
proxy.  squid asks no DNS server (127.0.0.1 has none).  Only CONNECT
tunnels to the names and ports in `allow` are let through; anything else
is answered 403 Forbidden, and with `users` a request without their
credentials gets 407 Proxy Authentication Required.

Runs in the foreground (`squid -N`) with its own configuration, logs and
pid file in a temporary folder, no cache.  As root squid works as the
`proxy` user, so that folder belongs to it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.testbed.klippy import POLL_INTERVAL
from tests.testbed.procs import free_port, launch, log_tail, stop_process
from tests.testbed.servers import BackgroundServer

NCSA_AUTH = "/usr/lib/squid/basic_ncsa_auth"

_CONF = """\
http_port 127.0.0.1:{port}
{user}pid_filename {dir}/squid.pid
cache_log {dir}/cache.log
access_log stdio:{dir}/access.log
buffered_logs off
coredump_dir {dir}
cache deny all
cache_mem 1 MB
hosts_file {dir}/hosts
dns_nameservers 127.0.0.1
netdb_filename none
icp_port 0
htcp_port 0
shutdown_lifetime 0 seconds
{auth}
acl CONNECT method CONNECT
acl from_here src 127.0.0.1
acl allowed_names dstdomain {names}
acl allowed_ports port {ports}
http_access deny !from_here
http_access deny !CONNECT
http_access deny !allowed_names
http_access deny !allowed_ports
{allow}
http_access deny all
"""

_AUTH = """\
auth_param basic program {helper} {dir}/passwords
auth_param basic realm polar-test
auth_param basic children 1 startup=1 idle=1
acl users proxy_auth REQUIRED"""


def find_squid() -> str | None:
    for path in (shutil.which("squid"), "/usr/sbin/squid"):
        if path and os.access(path, os.X_OK):
            return path
    return None


def _password_hash(password: str) -> str:
    return subprocess.run(["openssl", "passwd", "-6", "-stdin"],
                          input=password, capture_output=True, text=True,
                          check=True).stdout.strip()


class ProxyServer(BackgroundServer):
    def __init__(self, hosts: list[str], allow: dict[str, list[int]],
                 users: dict[str, str] | None = None) -> None:
        self.binary = find_squid()
        if not self.binary:
            raise FileNotFoundError("squid is not installed"
                                    " (apt-get install squid)")
        self.hosts = list(hosts)
        self.allow = allow
        self.users = dict(users or {})
        self.port = free_port()
        self.dir: Path | None = None
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % (self.port,)

    def url_with(self, user: str, password: str | None = None) -> str:
        password = self.users[user] if password is None else password
        return "http://%s:%s@127.0.0.1:%d" % (user, password, self.port)

    def _write_config(self) -> None:
        d = self.dir
        assert d is not None
        (d / "hosts").write_text("127.0.0.1 %s\n" % (" ".join(self.hosts),))
        auth = ""
        allow = "http_access allow all"
        if self.users:
            (d / "passwords").write_text("".join(
                "%s:%s\n" % (u, _password_hash(p))
                for u, p in self.users.items()))
            auth = _AUTH.format(helper=NCSA_AUTH, dir=d)
            allow = "http_access allow users"
        ports = sorted({p for ps in self.allow.values() for p in ps})
        user = "cache_effective_user proxy\n" if os.geteuid() == 0 else ""
        (d / "squid.conf").write_text(_CONF.format(
            port=self.port, dir=d, user=user, auth=auth, allow=allow,
            names=" ".join(self.allow), ports=" ".join(map(str, ports))))
        if os.geteuid() == 0:
            proxy = pwd.getpwnam("proxy")
            for path in [d, *d.iterdir()]:
                os.chown(path, proxy.pw_uid, proxy.pw_gid)

    def start(self, timeout: float = 30) -> ProxyServer:
        # Not under pytest's tmp_path: squid's user must reach the folder
        self.dir = Path(tempfile.mkdtemp(prefix="polar-squid-"))
        self.dir.chmod(0o755)
        self._write_config()
        conf = str(self.dir / "squid.conf")
        check = subprocess.run([self.binary, "-k", "parse", "-f", conf],
                               capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError("squid rejects the configuration:\n"
                               + check.stdout + check.stderr)
        with open(self.dir / "squid.out", "ab") as out:
            self._proc = launch([self.binary, "-N", "-f", conf],
                                stdin=subprocess.DEVNULL, stdout=out,
                                stderr=out)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError("squid exited (%s):\n%s" % (
                    self._proc.returncode, log_tail(self.dir / "cache.log")))
            try:
                with socket.create_connection(("127.0.0.1", self.port), 1):
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("squid not listening within %.0fs"
                                   % (timeout,))
            time.sleep(POLL_INTERVAL)

    def log(self) -> list[tuple[str, str, int]]:
        """(method, target, status) of each finished request; a CONNECT
        tunnel is logged when it closes."""
        entries = []
        assert self.dir is not None
        try:
            text = (self.dir / "access.log").read_text(errors="replace")
        except FileNotFoundError:
            return []
        for line in text.splitlines():
            fields = line.split()
            if len(fields) >= 7 and "/" in fields[3]:
                status = fields[3].rsplit("/", 1)[1]
                entries.append((fields[5], fields[6],
                                int(status) if status.isdigit() else 0))
        return entries

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
