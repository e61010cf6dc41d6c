"""Bad [polar_cloud] options give a clear config error naming the option;
broken environments (missing packages, corrupt identity files) leave klippy
ready with an explanation in POLAR_STATUS."""
from __future__ import annotations

import json
import re

import pytest

from tests.testbed.helpers import EXTRA, polar_cfg, polar_status, wait_polar
from tests.testbed.klippy import REPO, KlippyError


@pytest.mark.parametrize("options,message", [
    ({"server_url": "http://example.com"}, "'server_url' .* must use https"),
    ({"server_url": "ftp://example.com"}, "'server_url' .* https:// URL"),
    ({"server_url": "https://user:pw@example.com"}, "'server_url' .*"
     "credentials"),
    ({"machine_type": "triangle"}, "machine_type"),
    ({"status_interval": "1"}, "status_interval"),
    ({"manufacturer": "k l"}, "'manufacturer'"),
    ({"printer_make": "x" * 80}, "'printer_make'"),
    ({"max_job_size": "0"}, "max_job_size"),
    ({"cloud_macros": "LOAD_FILAMENT, rm -rf"}, "'cloud_macros'"),
    ({"cloud_macros": "SAVE_CONFIG"}, "'cloud_macros' .* 'SAVE_CONFIG' is"
     " not a gcode_macro"),
    ({"cloud_macros": "G28"}, "'cloud_macros' .* 'G28' is not a gcode_macro"),
    ({"rotation": "45"}, "rotation"),
    ({"snapshot_url": "ftp://cam/x"}, "snapshot_url"),
    ({"max_image_size": "10"}, "max_image_size"),
    ({"allow_raw_gcode": "maybe"}, "allow_raw_gcode"),
    ({"require_plate_clear": "maybe"}, "require_plate_clear"),
    ({"filament_change_macros": "M600, {x}"}, "'filament_change_macros'"),
    ({"web_url": "http://polar3d.com"}, "'web_url' .* must use https"),
    ({"email": "a@b.org"}, "'email' is not valid"),
])
def test_bad_option_is_a_clear_config_error(make_klippy, sim, options,
                                            message):
    k = make_klippy("klipper", extra_cfg=polar_cfg(sim.url, **options),
                    extras={"polar_cloud": EXTRA}, start=False)
    with pytest.raises(KlippyError, match=message):
        k.start()
    k.stop()


def test_cloud_macros_may_be_defined_anywhere_in_printer_cfg(make_klippy,
                                                            sim):
    # Before and after [polar_cloud], in any case
    before = "[gcode_macro Purge_Line]\ngcode:\n  G4 P1\n"
    after = "[gcode_macro load_filament]\ngcode:\n  G4 P1\n"
    k = make_klippy("klipper", extra_cfg=before + polar_cfg(
        sim.url, cloud_macros="LOAD_FILAMENT, purge_line") + after,
        extras={"polar_cloud": EXTRA})
    assert k.info()["state"] == "ready"
    k.stop()


@pytest.mark.parametrize("folder", ["config", "gcodes", "logs"])
def test_state_path_inside_a_served_folder_is_refused(make_klippy, sim,
                                                      folder):
    k = make_klippy("klipper", extras={"polar_cloud": EXTRA}, start=False)
    root = {"config": k.config_dir, "gcodes": k.gcodes_dir,
            "logs": k.logs_dir}[folder]
    k.extra_cfg = polar_cfg(sim.url, state_path=root / "secret")
    with pytest.raises(KlippyError, match="'state_path' .* not be inside"
                       " the printer's %s folder" % (folder,)):
        k.start()
    k.stop()


def test_missing_packages_leave_klippy_ready_and_explained(make_klippy, sim):
    env = {"PYTHONPATH": str(REPO / "tests" / "testbed" / "no_socketio")}
    k = make_klippy("klipper", extra_cfg=polar_cfg(sim.url), env=env,
                    extras={"polar_cloud": EXTRA})
    assert k.info()["state"] == "ready"
    out = k.subscribe_output()
    k.gcode("POLAR_STATUS")
    line = out.wait_for(r"last error: .*")
    assert "python-socketio" in line and "install.sh" in line
    with pytest.raises(KlippyError, match="python-socketio"):
        k.gcode("POLAR_REGISTER EMAIL=a@b.org PIN=1234")
    assert polar_status(k)["state"] == "disabled"
    assert sim.connected() == 0
    k.stop()


@pytest.mark.parametrize("files,message", [
    ({"identity.json": "{not json"}, "corrupt"),
    ({"identity.json": json.dumps({"serial": "KL000009"})}, "key .* missing"),
    ({"identity.json": json.dumps({"serial": "KL000009"}),
      "key.pem": "-----BEGIN RSA PRIVATE KEY-----\ngarbage\n"}, "corrupt"),
])
def test_corrupt_identity_is_a_clear_error(make_klippy, sim, files, message):
    k = make_klippy("klipper", extra_cfg=polar_cfg(sim.url),
                    extras={"polar_cloud": EXTRA}, start=False)
    state = k.workdir / "polar_cloud"
    state.mkdir(mode=0o700)
    for name, text in files.items():
        (state / name).write_text(text)
    k.start()
    # The identity is read (the key checked by a child) on the session's
    # thread, after klippy is ready
    st = wait_polar(k, lambda s: s.get("state") not in (None, "stopped"))
    assert st["state"] == "auth_failed", st
    assert re.search(message, st["last_error"]), st["last_error"]
    assert k.info()["state"] == "ready"
    assert "Traceback" not in k.log_text()
    k.stop()
