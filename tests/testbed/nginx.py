"""nginx (Debian's) in front of a test Moonraker, set up as on a Mainsail host.

    site = Nginx(workdir, moonraker_port=mr.port).start()
    site.url + "/polar-cloud/"      # the page, through install.sh's snippet
    site.stop()

The server block is MainsailOS's (`/websocket` and the API prefixes proxied
to Moonraker, everything else a single-page app); the snippet of
`install.sh --nginx` (scripts/install_nginx.sh) is included after
`server_name`, exactly where that script puts it, so the test serves the
page the way a user's printer does.  It runs
in the foreground as a single process (`master_process off`) with every
path (pid, logs, temp files) inside workdir, on a free loopback port.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.testbed.klippy import REPO
from tests.testbed.procs import free_port, launch, stop_process
from tests.testbed.servers import (
    BackgroundServer,
    port_open,
    process_gone,
    wait_ready,
)

MIME_TYPES = Path("/etc/nginx/mime.types")

_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 64; }}
http {{
    include {mime};
    default_type application/octet-stream;
    access_log {dir}/access.log;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    sendfile on;

    # MainsailOS /etc/nginx/conf.d/upstreams.conf and common_vars.conf
    upstream apiserver {{
        ip_hash;
        server 127.0.0.1:{mr_port};
    }}
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        '' close;
    }}

    # MainsailOS /etc/nginx/sites-available/mainsail
    server {{
        listen 127.0.0.1:{port};
        root {dir}/mainsail;
        index index.html;
        server_name _;
    {include}
        client_max_body_size 0;
        proxy_request_buffering off;

        location / {{
            try_files $uri $uri/ /index.html;
        }}
        location = /index.html {{
            add_header Cache-Control "no-store, no-cache, must-revalidate";
        }}
        location /websocket {{
            proxy_pass http://apiserver/websocket;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $http_host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_read_timeout 86400;
        }}
        location ~ ^/(printer|api|access|machine|server)/ {{
            proxy_pass http://apiserver$request_uri;
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Scheme $scheme;
        }}
    }}
}}
"""

MAINSAIL_INDEX = "<!DOCTYPE html><title>Mainsail</title><p>mainsail stand-in</p>\n"


def find_nginx() -> str | None:
    for path in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if path and os.access(path, os.X_OK):
            return path
    return None


def install_sh_snippet(repo: Path = REPO) -> str:
    """The snippet `install.sh --nginx` writes for a clone at `repo`, as
    its scripts/install_nginx.sh prints it: the test serves the page with
    exactly what the installer would install."""
    proc = subprocess.run(["bash", str(repo / "scripts" / "install_nginx.sh"),
                           "snippet"], capture_output=True, text=True, check=True)
    return proc.stdout


class Nginx(BackgroundServer):
    def __init__(self, workdir: Path, moonraker_port: int,
                 repo: Path = REPO, binary: str | None = None) -> None:
        self.binary = binary or find_nginx()
        if not self.binary:
            raise FileNotFoundError("nginx is not installed"
                                    " (apt-get install nginx-light)")
        self.dir = Path(workdir) / "nginx"
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % (self.port,)
        self.moonraker_port = moonraker_port
        self.repo = repo
        self.conf_path = self.dir / "nginx.conf"
        self.snippet_path = self.dir / "snippets" / "polar_cloud.conf"
        self.error_log = self.dir / "error.log"
        self._proc: subprocess.Popen | None = None

    def write_config(self) -> None:
        for sub in ("tmp", "snippets", "mainsail"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "mainsail" / "index.html").write_text(MAINSAIL_INDEX)
        self.snippet_path.write_text(install_sh_snippet(self.repo))
        self.conf_path.write_text(_CONF.format(
            dir=self.dir, mime=MIME_TYPES, mr_port=self.moonraker_port,
            port=self.port, include='    include "%s";' % (self.snippet_path,)))

    def start(self, timeout: float = 20) -> Nginx:
        self.write_config()
        cmd = [self.binary, "-p", str(self.dir), "-c", str(self.conf_path),
               "-e", str(self.error_log)]
        test = subprocess.run(cmd + ["-t"], capture_output=True, text=True)
        if test.returncode != 0:
            raise RuntimeError("nginx rejects the configuration:\n" + test.stderr)
        with open(self.dir / "nginx.out", "ab") as out:
            self._proc = launch(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=out)
        wait_ready(lambda: port_open("127.0.0.1", self.port), timeout,
                   "nginx", process_gone(self._proc, self.error_log))
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc)
