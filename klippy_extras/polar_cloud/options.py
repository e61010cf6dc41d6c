# The [polar_cloud] options, read once from printer.cfg
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import os
import re
import urllib.parse
from dataclasses import dataclass

from .camera import CameraOptions, read_camera_options
from .protocol import is_loopback_host

DEFAULT_SERVER = "https://printer4.polar3d.com"
DEFAULT_WEB = "https://polar3d.com"
MACHINE_TYPES = {"cartesian": "Cartesian", "delta": "Delta", "belt": "Belt"}


def check_server_url(url: str) -> str:
    """Return an error text for an unusable server_url, '' when fine."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "is not a URL"
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return "must be an https:// URL"
    if parts.username or parts.password or parts.query or parts.fragment:
        return "must not carry credentials, a query or a fragment"
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        return "must use https (http is only for a local test cloud)"
    return ""


def default_state_path(config_file: str) -> str:
    # Beside the folder holding printer.cfg (~/printer_data/polar_cloud),
    # which Moonraker does not serve.  Outside a printer_data layout (e.g.
    # ~/klipper_config) a hidden name keeps clear of a checkout of this
    # repository at ~/polar_cloud.
    config_dir = os.path.dirname(os.path.abspath(config_file))
    name = "polar_cloud" if os.path.basename(config_dir) == "config" \
        else ".polar_cloud"
    return os.path.join(os.path.dirname(config_dir), name)


def _inside(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([path, root]) == root


def served_folders(config, config_file: str) -> dict[str, str]:
    """The folders Moonraker serves to the network: config, gcodes, logs."""
    folders = {"config": os.path.dirname(os.path.abspath(config_file))}
    if config.has_section("virtual_sdcard"):
        path = config.getsection("virtual_sdcard").get("path", None,
                                                       note_valid=False)
        if path:
            folders["gcodes"] = os.path.expanduser(path)
    log_file = config.get_printer().get_start_args().get("log_file")
    if log_file:
        folders["logs"] = os.path.dirname(os.path.abspath(log_file))
    return folders


def served_folder(path: str, folders: dict[str, str]) -> str:
    """The name of the served folder that holds path, '' if none."""
    return next((name for name, root in folders.items()
                 if _inside(path, root)), "")


@dataclass(frozen=True)
class Options:
    server_url: str
    state_path: str
    manufacturer: str
    printer_make: str
    machine_type: str
    status_interval: float
    active_interval: float
    verbose: bool
    max_job_size: int
    allow_raw_gcode: bool
    allow_jog: bool
    cloud_macros: tuple
    camera: CameraOptions
    # A CA bundle to verify server_url with instead of the system's (a
    # private CA); verification itself can never be switched off
    ca_file: str = ""
    # The lab workflow (lab.py): a build plate gate between prints, and
    # asking the cloud for the next queued job after a completed one
    require_plate_clear: bool = False
    continuous_printing: bool = False
    # Commands whose pause is a filament change (pauses.py)
    filament_change_macros: tuple = ("M600",)
    # Polar's web site: the printer make list (makes.py)
    web_url: str = DEFAULT_WEB


def read_macro_list(config, option: str, default: str) -> tuple:
    """A comma or newline separated list of G-code command names."""
    names = [m.strip().upper() for m in re.split(
        r"[,\n]", config.get(option, default))]
    names = tuple(m for m in names if m)
    for name in names:
        if not re.match(r"^[A-Z][A-Z0-9_]{0,63}$", name):
            raise config.error("Option '%s' in section 'polar_cloud' has an"
                               " invalid macro name '%s'" % (option, name[:40]))
    return names


def read_options(config) -> Options:
    printer = config.get_printer()
    error = config.error
    server_url = config.get("server_url", DEFAULT_SERVER).strip().rstrip("/")
    problem = check_server_url(server_url)
    if problem:
        raise error("Option 'server_url' in section 'polar_cloud' %s"
                    % (problem,))
    config_file = printer.get_start_args().get("config_file", "printer.cfg")
    state_path = config.get("state_path", None)
    if state_path is None:
        state_path = default_state_path(config_file)
    state_path = os.path.normpath(os.path.expanduser(state_path))
    served = served_folder(state_path, served_folders(config, config_file))
    if served:
        raise error("Option 'state_path' in section 'polar_cloud' must not be"
                    " inside the printer's %s folder (it is served to the"
                    " network by Moonraker)" % (served,))
    ca_file = config.get("ca_file", "").strip()
    if ca_file:
        ca_file = os.path.abspath(os.path.expanduser(ca_file))
        if not os.path.isfile(ca_file) or not os.access(ca_file, os.R_OK):
            raise error("Option 'ca_file' in section 'polar_cloud' must be a"
                        " readable file of PEM CA certificates")
    manufacturer = config.get("manufacturer", "kl").strip()
    if not re.match(r"^[A-Za-z]{1,16}$", manufacturer):
        raise error("Option 'manufacturer' in section 'polar_cloud' must be"
                    " a Polar manufacturer code such as 'kl'")
    printer_make = config.get("printer_make", "Cartesian").strip()
    if not re.match(r"^[\w .+()/-]{1,64}$", printer_make):
        raise error("Option 'printer_make' in section 'polar_cloud' must be"
                    " a printer model name of up to 64 plain characters")
    machine_type = config.getchoice("machine_type", MACHINE_TYPES,
                                    "cartesian")
    status_interval = config.getfloat("status_interval", 60., minval=10.,
                                      maxval=3600.)
    verbose = config.getboolean("verbose", False)
    max_job_size = config.getint("max_job_size", 1024, minval=1,
                                 maxval=1024 * 1024) * 1024 * 1024
    allow_raw_gcode = config.getboolean("allow_raw_gcode", False)
    allow_jog = config.getboolean("allow_jog", False)
    macros = read_macro_list(config, "cloud_macros", "")
    web_url = config.get("web_url", DEFAULT_WEB).strip().rstrip("/")
    problem = check_server_url(web_url)
    if problem:
        raise error("Option 'web_url' in section 'polar_cloud' %s"
                    % (problem,))
    return Options(server_url=server_url, state_path=state_path,
                   manufacturer=manufacturer, printer_make=printer_make,
                   machine_type=machine_type, status_interval=status_interval,
                   active_interval=10., verbose=verbose,
                   max_job_size=max_job_size, allow_raw_gcode=allow_raw_gcode,
                   allow_jog=allow_jog, cloud_macros=macros,
                   camera=read_camera_options(config), ca_file=ca_file,
                   require_plate_clear=config.getboolean(
                       "require_plate_clear", False),
                   continuous_printing=config.getboolean(
                       "continuous_printing", False),
                   filament_change_macros=read_macro_list(
                       config, "filament_change_macros", "M600"),
                   web_url=web_url)
