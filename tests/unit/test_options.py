"""The [polar_cloud] options (options.py), read from a fake config: the
defaults, the values, and a config error naming the option for each bad
one.  The same errors in a real klippy: tests/klippy/test_config.py."""
from __future__ import annotations

import configparser
import os

import pytest

from klippy_extras.polar_cloud import options
from klippy_extras.polar_cloud.camera import CameraOptions
from tests.unit.fakes import FakeConfig, FakePrinter

CONFIG_FILE = "/home/pi/printer_data/config/printer.cfg"


def read(sections=None, start_args=None, **values) -> options.Options:
    printer = FakePrinter(start_args=start_args)
    return options.read_options(FakeConfig(printer, sections, **values))


def test_defaults():
    opts = read()
    assert opts == options.Options(
        server_url="https://printer4.polar3d.com",
        state_path="/home/pi/printer_data/polar_cloud", manufacturer="kl",
        printer_make="Cartesian", machine_type="Cartesian",
        status_interval=60., active_interval=10., verbose=False,
        max_job_size=1024 * 1024 * 1024, allow_raw_gcode=False,
        allow_jog=False, cloud_macros=(), camera=CameraOptions(), ca_file="")


def test_values(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    opts = read(sections={"gcode_macro LOAD_FILAMENT": {},
                          "gcode_macro purge_line": {}},
                server_url="http://127.0.0.1:8765/", state_path="~/polar",
                manufacturer="ab", printer_make="Voron 2.4 (350)",
                machine_type="delta", status_interval=30, verbose="True",
                max_job_size=2, allow_raw_gcode="True", allow_jog="true",
                cloud_macros="load_filament,\nPURGE_LINE", ca_file=str(ca),
                rotation="180")
    assert opts.server_url == "http://127.0.0.1:8765"
    assert opts.state_path == os.path.expanduser("~/polar")
    assert (opts.manufacturer, opts.printer_make, opts.machine_type) == (
        "ab", "Voron 2.4 (350)", "Delta")
    assert (opts.status_interval, opts.verbose) == (30., True)
    assert opts.max_job_size == 2 * 1024 * 1024
    assert (opts.allow_raw_gcode, opts.allow_jog) == (True, True)
    assert opts.cloud_macros == ("LOAD_FILAMENT", "PURGE_LINE")
    assert opts.ca_file == str(ca) and opts.camera.rotation == 180


@pytest.mark.parametrize("config_file,state_path", [
    ("/home/pi/printer_data/config/printer.cfg",
     "/home/pi/printer_data/polar_cloud"),
    ("/home/pi/klipper_config/printer.cfg", "/home/pi/.polar_cloud"),
])
def test_the_state_folder_sits_beside_the_config_folder(config_file,
                                                         state_path):
    assert read(start_args={"config_file": config_file}).state_path \
        == state_path


@pytest.mark.parametrize("option,value", [
    ("server_url", "http://example.com"),
    ("server_url", "ftp://example.com"),
    ("server_url", "https://user:pw@example.com"),
    ("server_url", "https://example.com/?x=1"),
    ("server_url", "https://"),
    ("manufacturer", "k l"),
    ("manufacturer", "x" * 17),
    ("printer_make", "x" * 80),
    ("printer_make", "Voron; rm -rf"),
    ("machine_type", "triangle"),
    ("status_interval", "1"),
    ("status_interval", "7200"),
    ("verbose", "maybe"),
    ("max_job_size", "0"),
    ("allow_raw_gcode", "maybe"),
    ("allow_jog", "2"),
    ("cloud_macros", "LOAD_FILAMENT, rm -rf"),
    ("cloud_macros", "SAVE_CONFIG"),
    ("ca_file", "/nonexistent/ca.pem"),
    ("rotation", "45"),
    ("webcam_enabled", "maybe"),
])
def test_each_bad_option_is_a_config_error_naming_it(option, value):
    with pytest.raises(configparser.Error, match="'?%s'?" % (option,)):
        read(**{option: value})


def test_a_macro_must_be_a_gcode_macro_of_printer_cfg():
    with pytest.raises(configparser.Error,
                       match="'PURGE' is not a gcode_macro"):
        read(sections={"gcode_macro LOAD_FILAMENT": {}},
             cloud_macros="LOAD_FILAMENT, PURGE")


@pytest.mark.parametrize("folder", ["config", "gcodes", "logs"])
def test_state_path_inside_a_served_folder_is_refused(folder):
    sections = {"virtual_sdcard": {"path": "/home/pi/printer_data/gcodes"}}
    start_args = {"config_file": CONFIG_FILE,
                  "log_file": "/home/pi/printer_data/logs/klippy.log"}
    with pytest.raises(configparser.Error, match="'state_path' .* not be"
                       " inside the printer's %s folder" % (folder,)):
        read(sections, start_args,
             state_path="/home/pi/printer_data/%s/polar" % (folder,))


@pytest.mark.parametrize("url,problem", [
    ("https://printer4.polar3d.com", ""),
    ("http://localhost:8765", ""),
    ("http://[::1]:8765", ""),
    ("http://192.168.1.5", "must use https"),
    ("wss://printer4.polar3d.com", "must be an https:// URL"),
    ("https://printer4.polar3d.com#x", "must not carry"),
])
def test_check_server_url(url, problem):
    found = options.check_server_url(url)
    assert (problem in found) if problem else found == ""
