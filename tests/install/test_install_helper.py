"""scripts/install_helper.py, function by function (install.sh's Python).

tests/test_install.py runs it through install.sh on whole layouts; these
cases pin down the edge cases: moonraker.conf edits byte for byte, the
state folder and instance rules, Moonraker's answers, the pins.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import install_helper as h  # noqa: E402

INCLUDE = "[include polar_cloud_update.conf]\n"
OLD = ("# polar_cloud: added by install.sh; `install.sh --uninstall` removes it\n"
       "[update_manager polar_cloud]\ntype: git_repo\npath: /old\n")
BLOCK = h.um_block("/home/pi/polar_cloud", "https://x.invalid/p.git",
                   "/home/pi/klippy-env")


# --- moonraker.conf ------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "", "\n", "[server]\nport: 7125\n", "[server]\nport: 7125",
    "[server]\r\nport: 7125\r\n", "[server]\n\n\n", "# only a comment\n",
])
def test_include_added_and_removed_byte_for_byte(text):
    added = h.conf_with_include(text)
    assert added.count(INCLUDE) == 1 and added.endswith(INCLUDE)
    assert h.conf_with_include(added) == added  # once
    removed = h.conf_without_us(added)
    # A missing final newline is added for good; nothing else changes.
    assert removed == (text + "\n" if text and not text.endswith("\n") else text)


def test_include_goes_where_the_old_inline_section_was():
    text = "[server]\nport: 7125\n\n" + OLD + "\n# crowsnest\n[update_manager c]\n"
    assert h.conf_with_include(text) == (
        "[server]\nport: 7125\n\n" + INCLUDE + "\n# crowsnest\n[update_manager c]\n")
    # An include already there: the old section just goes.
    both = "[server]\n\n" + INCLUDE + "\n" + OLD
    assert h.conf_with_include(both) == "[server]\n\n" + INCLUDE
    assert h.conf_without_us(both) == "[server]\n"


def test_a_hand_written_section_is_not_ours():
    text = "[server]\n\n[update_manager polar_cloud]\ntype: git_repo\n"
    start, end, ours = h.find_section(text.splitlines(True))
    assert (start, end, ours) == (2, 4, False)
    assert h.conf_without_us(text) == text


def test_update_manager_install_and_remove(tmp_path, capsys):
    conf = tmp_path / "moonraker.conf"
    conf.write_text("[server]\n")
    assert h.update_manager_install(str(tmp_path), BLOCK) is True
    assert (tmp_path / h.UM_FILE).read_text() == BLOCK
    assert conf.read_text() == "[server]\n\n" + INCLUDE
    assert h.update_manager_install(str(tmp_path), BLOCK) is False
    assert "already includes" in capsys.readouterr().out
    [backup] = tmp_path.glob("moonraker.conf.polar_cloud-*.bak")
    assert backup.read_text() == "[server]\n"
    assert h.update_manager_remove(str(tmp_path)) is True
    assert conf.read_text() == "[server]\n"
    assert not (tmp_path / h.UM_FILE).exists()
    assert h.update_manager_remove(str(tmp_path)) is False
    assert len(list(tmp_path.glob("*.bak"))) == 2


def test_update_manager_leaves_sections_it_did_not_write(tmp_path, capsys):
    (tmp_path / "moonraker.conf").write_text("[server]\n")
    (tmp_path / "updates.conf").write_text("[update_manager polar_cloud]\n")
    assert h.update_manager_install(str(tmp_path), BLOCK) is False
    assert "already in %s" % (tmp_path / "updates.conf") in capsys.readouterr().out
    assert not (tmp_path / h.UM_FILE).exists()
    h.update_manager_remove(str(tmp_path))
    assert "still in" in capsys.readouterr().err


def test_the_block_is_what_moonraker_wants():
    assert BLOCK.splitlines()[2:] == [
        "[update_manager polar_cloud]", "type: git_repo",
        "path: /home/pi/polar_cloud", "origin: https://x.invalid/p.git",
        "primary_branch: main", "virtualenv: /home/pi/klippy-env",
        "requirements: requirements.txt",
        "system_dependencies: system-dependencies.json",
        "managed_services: klipper"]


def test_backups_never_overwrite(tmp_path):
    f = tmp_path / "moonraker.conf"
    f.write_text("a\n")
    names = {h.backup(str(f)) for _ in range(3)}
    assert len(names) == 3
    assert all(Path(n).read_text() == "a\n" for n in names)


# --- config values, state folder, instances ------------------------------------


def test_section_value():
    text = ("[server]\nhost: 0.0.0.0\n  Port = 7126  # ours\n"
            "[polar_cloud]\nstate_path: ~/x ; comment\n")
    assert h.section_value(text, "server", "port") == "7126"
    assert h.section_value(text, "polar_cloud", "state_path") == "~/x"
    assert h.section_value(text, "server", "state_path") is None


def test_moonraker_url(tmp_path):
    conf = tmp_path / "moonraker.conf"
    assert h.moonraker_url(str(conf)) == "http://127.0.0.1:7125"
    conf.write_text("[server]\nport: 7200\n")
    assert h.moonraker_url(str(conf)) == "http://127.0.0.1:7200"


def test_state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = tmp_path / "printer_data" / "config"
    config.mkdir(parents=True)
    assert h.state_dir(str(config)) == str(tmp_path / "printer_data" / "polar_cloud")
    legacy = tmp_path / "klipper_config"
    legacy.mkdir()
    assert h.state_dir(str(legacy)) == str(tmp_path / ".polar_cloud")
    # SAVE_CONFIG's backups do not count; included files do.
    (config / "printer-20240101_120000.cfg").write_text(
        "[polar_cloud]\nstate_path: /nope\n")
    assert h.state_dir(str(config)).endswith("printer_data/polar_cloud")
    (config / "extras").mkdir()
    (config / "extras" / "polar.cfg").write_text(
        "[polar_cloud]\nstate_path: ~/ident/  # mine\n")
    assert h.state_dir(str(config)) == str(tmp_path / "ident")
    assert h.polar_cloud_cfgs(str(config)) == [str(config / "extras" / "polar.cfg")]
    (config / "extras" / "polar.cfg").write_text("[polar_cloud]\nstate_path: rel\n")
    assert h.state_dir(str(config)) == ""


@pytest.mark.parametrize("name, instance", [
    ("printer_data", ""), ("printer_2_data", "2"), ("printer_data_3", "3"),
    ("voron_data", "voron"), ("printer_voron_data", "voron"),
])
def test_instance_name(name, instance):
    assert h.instance_name("/home/pi/" + name) == instance


def make_instances(home: Path, *names: str):
    for name in names:
        (home / name / "config").mkdir(parents=True)
    (home / "notes_data").mkdir(exist_ok=True)  # no config/: not an instance


def test_pick_data_dirs(tmp_path):
    home = str(tmp_path)
    with pytest.raises(h.Error, match="no printer data directory found"):
        h.pick_data_dirs(home, False, "", "", "")
    with pytest.raises(h.Error, match="--all: no printer data directory"):
        h.pick_data_dirs(home, True, "", "", "")
    make_instances(tmp_path, "printer_data")
    d = str(tmp_path / "printer_data")
    assert h.pick_data_dirs(home, False, "", "", "") == [(d, d + "/config", "")]
    make_instances(tmp_path, "printer_2_data", "printer_data_3", "voron_data")
    with pytest.raises(h.Error, match="several printer data directories: .*--all"):
        h.pick_data_dirs(home, False, "", "", "")
    assert [n for _, _, n in h.pick_data_dirs(home, True, "", "", "")] == [
        "2", "", "3", "voron"]
    assert h.pick_data_dirs(home, False, "", "", "voron")[0][0] == str(
        tmp_path / "voron_data")
    assert h.pick_data_dirs(home, False, "", "", "3")[0][0] == str(
        tmp_path / "printer_data_3")
    with pytest.raises(h.Error, match="instance 'x': none of"):
        h.pick_data_dirs(home, False, "", "", "x")
    # -c: the data directory is the config folder's parent
    cfg = tmp_path / "elsewhere" / "cfg"
    cfg.mkdir(parents=True)
    assert h.pick_data_dirs(home, False, "", str(cfg), "") == [
        (str(cfg.parent), str(cfg), "")]
    with pytest.raises(h.Error, match="does not exist"):
        h.pick_data_dirs(home, False, str(tmp_path / "gone"), "", "")


def test_instances_records(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    make_instances(tmp_path, "printer_data", "printer_2_data")
    (tmp_path / "printer_2_data" / "config" / "moonraker.conf").write_text(
        "[server]\nport: 7126\n")
    a = argparse.Namespace(all=True, data="", config="", instance="", service="",
                           moonraker_service="", moonraker_url="")
    [two, one] = h.instances(a)
    assert two[2:5] == ["klipper-2", "moonraker-2", "http://127.0.0.1:7126"]
    assert one[2:5] == ["klipper", "moonraker", "http://127.0.0.1:7125"]
    (tmp_path / "printer_2_data" / "config" / h.UM_FILE).write_text("")
    assert h.installed_elsewhere(one[0]) == [two[0]]
    assert h.installed_elsewhere(two[0]) == []


# --- Moonraker's API -------------------------------------------------------------


class Moonraker:
    def __init__(self, query=(200, {"result": {"status": {
            "print_stats": {"state": "standby"}}}}), restart=(200, {"result": "ok"})):
        self.query, self.restart, self.posts = query, restart, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def reply(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self.reply(*outer.query)

            def do_POST(self):
                outer.posts.append(self.path)
                self.reply(*outer.restart)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mr():
    m = Moonraker()
    yield m
    m.close()


def test_print_state(mr):
    assert h.print_state(mr.url) == "standby"
    mr.query = (200, {"result": {"status": {"print_stats": {"state": "printing"}}}})
    assert h.print_state(mr.url) == "printing"
    mr.query = (200, {"result": {"status": {}}})
    assert h.print_state(mr.url) == "notready"
    mr.query = (401, {"error": {"message": "Unauthorized"}})
    assert h.print_state(mr.url) == "denied"
    mr.query = (503, {"error": {"message": "Klippy Host not connected"}})
    assert h.print_state(mr.url) == "notready"
    mr.query = (200, ["not", "an", "object"])
    assert h.print_state(mr.url) == "unknown"
    url = mr.url
    mr.close()
    assert h.print_state(url) == "unreachable"


def restarts(monkeypatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(h, "systemctl_restart", lambda s, sudo: calls.append(s))
    return calls


def test_restart_through_moonraker(mr, monkeypatch, capsys):
    systemctl = restarts(monkeypatch)
    h.restart(mr.url, ["klipper-2", "moonraker-2"])
    assert mr.posts == ["/machine/services/restart?service=klipper-2",
                        "/machine/services/restart?service=moonraker-2"]
    assert systemctl == []
    assert "restarted klipper-2 through Moonraker" in capsys.readouterr().out


def test_restart_falls_back_to_systemctl(mr, monkeypatch, capsys):
    systemctl = restarts(monkeypatch)
    mr.restart = (503, {"error": {"code": 503,
                                  "message": "Service Actions Not Available"}})
    h.restart(mr.url, ["klipper"])
    assert systemctl == ["klipper"]
    assert "(HTTP 503: Service Actions Not Available): trying systemctl" \
        in capsys.readouterr().out
    url = mr.url
    mr.close()
    h.restart(url, ["klipper", "moonraker"])
    assert systemctl == ["klipper", "klipper", "moonraker"]


@pytest.mark.parametrize("state", ["printing", "paused"])
def test_never_restarts_a_printing_klipper(mr, monkeypatch, capsys, state):
    systemctl = restarts(monkeypatch)
    mr.query = (200, {"result": {"status": {"print_stats": {"state": state}}}})
    h.restart(mr.url, ["klipper"])
    mr.query = (403, {})
    h.restart(mr.url, ["klipper"])
    assert mr.posts == [] and systemctl == []
    err = capsys.readouterr().err
    assert "Klipper is %s: not restarting" % state in err
    assert "did not say whether a print is running (denied)" in err
    h.restart(mr.url, ["klipper"], force=True)
    assert mr.posts == ["/machine/services/restart?service=klipper"]


def test_restart_held_or_not_wanted(mr, monkeypatch, capsys):
    systemctl = restarts(monkeypatch)
    h.restart(mr.url, ["klipper"], hold="[polar_cloud] is still in printer.cfg")
    h.restart(mr.url, ["klipper"], no_restart=True)
    assert mr.posts == [] and systemctl == []
    out = capsys.readouterr()
    assert "[polar_cloud] is still in printer.cfg" in out.err
    assert "--force-restart overrides" in out.out and "--no-restart" in out.out


def test_systemctl_restart_without_systemd(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("POLAR_SYSTEMD_DIR", str(tmp_path / "none"))
    h.systemctl_restart("klipper", sudo=True)
    assert "no systemd here" in capsys.readouterr().out


# --- pins --------------------------------------------------------------------------


def test_klipper_requirements(tmp_path):
    reqs = tmp_path / "klippy-requirements.txt"
    reqs.write_text("# comment\ncffi==1.15.1 ; python_version < '3.13'\n\n"
                    "pyserial==3.4  # serial\n")
    assert h.klipper_requirements(str(reqs), None) == [
        "", "cffi==1.15.1 ; python_version < '3.13'", "", "pyserial==3.4"]
    assert h.klipper_requirements(str(tmp_path / "none"), None) == h.KLIPPER_DEFAULT
    # A distribution's requirements, without those of its extras.
    pytest_reqs = h.klipper_requirements(None, "pytest")
    assert any(r.startswith("pluggy") for r in pytest_reqs)
    assert not any("extra" in r for r in pytest_reqs)


def test_klipper_pins():
    from importlib import metadata

    lines = ["pytest>=1", "PyTest", "no-such-package-polar==1.0 ; python_version > '3'",
             "no-such-package-other"]
    assert h.klipper_pins(lines) == ["pytest==%s" % metadata.version("pytest")]
    assert h.klipper_pins(lines, constraints=True) == [
        "pytest==%s" % metadata.version("pytest"),
        "no-such-package-polar==1.0 ; python_version > '3'"]


def test_main_exit_codes(tmp_path, capsys):
    (tmp_path / "moonraker.conf").write_text("[server]\n")
    args = ["update-manager", "install", str(tmp_path), "--path", "/r",
            "--origin", "o", "--venv", "/v"]
    assert h.main(args) == h.CHANGED
    assert h.main(args) == 0
    assert h.main(["update-manager", "remove", str(tmp_path)]) == h.CHANGED
    assert h.main(["instances", "--instance", "nope"]) == 1
    assert "ERROR: " in capsys.readouterr().err


# --- the link ------------------------------------------------------------------------


def make_klipper(root: Path) -> Path:
    klipper = root / "klipper"
    (klipper / "klippy" / "extras").mkdir(parents=True)
    (klipper / ".git" / "info").mkdir(parents=True)
    (klipper / ".git" / "info" / "exclude").write_text("# git\n*.swp")  # no final \n
    return klipper


def test_link_and_unlink(tmp_path, capsys):
    klipper, package = make_klipper(tmp_path), tmp_path / "repo" / "polar_cloud"
    package.mkdir(parents=True)
    link = klipper / "klippy" / "extras" / "polar_cloud"
    exclude = klipper / ".git" / "info" / "exclude"
    plugins = klipper / "klippy" / "plugins"
    plugins.mkdir()
    (plugins / "polar_cloud").symlink_to(package)  # Kalico: both would load
    h.link_check(str(klipper))
    h.link(str(klipper), str(package))
    assert os.readlink(link) == str(package)
    assert not (plugins / "polar_cloud").is_symlink()
    assert exclude.read_text() == "# git\n*.swp\n/klippy/extras/polar_cloud\n"
    h.link(str(klipper), str(package))
    assert "already in place" in capsys.readouterr().out
    assert exclude.read_text().count("polar_cloud") == 1
    link.unlink()
    link.symlink_to(tmp_path / "old")
    h.link(str(klipper), str(package))
    assert os.readlink(link) == str(package)
    assert "was -> %s" % (tmp_path / "old") in capsys.readouterr().out
    h.unlink(str(klipper))
    assert not link.is_symlink()
    assert exclude.read_text() == "# git\n*.swp\n"
    h.unlink(str(klipper))  # again: nothing to do


@pytest.mark.parametrize("taken, message", [
    ("klippy/extras/polar_cloud/", "is not a link"),
    ("klippy/extras/polar_cloud.py", "another polar_cloud module"),
    ("klippy/plugins/polar_cloud/", "Kalico would load polar_cloud twice"),
    ("klippy/plugins/polar_cloud.py", "Kalico would load polar_cloud twice"),
])
def test_link_check_refuses_a_taken_place(tmp_path, taken, message):
    klipper = make_klipper(tmp_path)
    path = klipper / taken.rstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    if taken.endswith("/"):
        path.mkdir()
    else:
        path.write_text("")
    with pytest.raises(h.Error, match=message):
        h.link_check(str(klipper))
