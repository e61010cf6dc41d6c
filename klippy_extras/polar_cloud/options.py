# The [polar_cloud] options, read once from printer.cfg
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import os
import re
import urllib.parse
from dataclasses import dataclass
from typing import Optional

from . import imaging
from .netpolicy import is_loopback_host

DEFAULT_SERVER = "https://printer4.polar3d.com"
DEFAULT_WEB = "https://polar3d.com"
MACHINE_TYPES = {"cartesian": "Cartesian", "delta": "Delta", "belt": "Belt"}


NOT_HTTP = "must be an http:// or https:// URL"


def check_http_url(url: str) -> str:
    """An error text unless url is http(s) with a host and no credentials,
    query or fragment; '' when fine."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "is not a URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return NOT_HTTP
    if parts.username or parts.password or parts.query or parts.fragment:
        return "must not carry credentials, a query or a fragment"
    return ""


def check_server_url(url: str) -> str:
    """Return an error text for an unusable server_url, '' when fine."""
    problem = check_http_url(url)
    if problem:
        return "must be an https:// URL" if problem == NOT_HTTP else problem
    parts = urllib.parse.urlsplit(url)
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


def defined_macros(config) -> set:
    """The names of the [gcode_macro] sections anywhere in printer.cfg
    (and its includes), whatever their order relative to [polar_cloud]."""
    names = set()
    for section in config.get_prefix_sections("gcode_macro "):
        words = section.get_name().split()
        if len(words) == 2:
            names.add(words[1].upper())
    return names


def read_cloud_macros(config) -> tuple:
    # A comma or newline separated list, as in other Klipper list options
    macros = [m.strip().upper() for m in re.split(
        r"[,\n]", config.get("cloud_macros", ""))]
    macros = tuple(m for m in macros if m)
    for name in macros:
        if not re.fullmatch(r"[A-Z][A-Z0-9_]{0,63}", name):
            raise config.error("Option 'cloud_macros' in section"
                               " 'polar_cloud' has an invalid macro name"
                               " '%s'" % (name[:40],))
    defined = defined_macros(config) if macros else set()
    for name in macros:
        if name not in defined:
            raise config.error("Option 'cloud_macros' in section"
                               " 'polar_cloud': '%s' is not a gcode_macro"
                               " (only your own [gcode_macro] sections can"
                               " be run from the cloud)" % (name,))
    return macros


# The webcam (camera.py, imaging.py; webcams.py may fill in the source)

DEFAULT_SNAPSHOT_URL = "http://127.0.0.1:8080/?action=snapshot"
DEFAULT_STREAM_URL = "/webcam/?action=stream"
ROTATIONS = {str(r): r for r in imaging.ROTATIONS}
TRISTATE = {"auto": None, "true": True, "yes": True, "on": True, "1": True,
            "false": False, "no": False, "off": False, "0": False}
MAX_FETCH = 10 * 1024 * 1024        # the largest frame read from a camera


@dataclass(frozen=True)
class CameraOptions:
    enabled: Optional[bool] = None      # None: on when the camera answers
    snapshot_url: str = DEFAULT_SNAPSHOT_URL
    stream_url: str = DEFAULT_STREAM_URL
    flip_horizontal: bool = False
    flip_vertical: bool = False
    rotation: int = 0                   # clockwise, like the front-ends
    max_image_size: int = 150000
    interval_idle: float = 60.
    interval_printing: float = 10.
    # The options printer.cfg sets: a webcam from Moonraker (webcams.py)
    # never overrides them
    explicit: frozenset = frozenset()


SOURCE_OPTIONS = ("snapshot_url", "stream_url", "flip_horizontal",
                  "flip_vertical", "rotation")


def check_snapshot_url(url: str) -> str:
    """Return an error text for an unusable snapshot_url, '' when fine."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "is not a URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL"
    if re.search(r"\s", url) or parts.fragment:
        return "must not contain spaces or a fragment"
    return ""


def check_stream_url(url: str) -> str:
    """camUrl goes to the cloud: a path on this host or an http(s) URL."""
    if not url:
        return ""
    if re.search(r"\s", url):
        return "must not contain spaces"
    if url.startswith("/") and not url.startswith("//"):
        return ""
    if check_snapshot_url(url):
        return "must be a path such as /webcam/?action=stream or an" \
            " http(s):// URL"
    if "@" in urllib.parse.urlsplit(url).netloc:
        return "must not carry credentials (it is sent to Polar Cloud)"
    return ""


def read_camera_options(config) -> CameraOptions:
    section = config.get_name()

    def error(option: str, text: str):
        return config.error("Option '%s' in section '%s' %s"
                            % (option, section, text))
    text = config.get("webcam_enabled", "auto").strip().lower()
    if text not in TRISTATE:
        raise error("webcam_enabled", "must be True, False or auto")
    snapshot_url = config.get("snapshot_url", DEFAULT_SNAPSHOT_URL).strip()
    problem = check_snapshot_url(snapshot_url)
    if problem:
        raise error("snapshot_url", problem)
    stream_url = config.get("stream_url", DEFAULT_STREAM_URL).strip()
    problem = check_stream_url(stream_url)
    if problem:
        raise error("stream_url", problem)
    return CameraOptions(
        enabled=TRISTATE[text], snapshot_url=snapshot_url,
        stream_url=stream_url,
        flip_horizontal=config.getboolean("flip_horizontal", False),
        flip_vertical=config.getboolean("flip_vertical", False),
        rotation=config.getchoice("rotation", ROTATIONS, "0"),
        max_image_size=config.getint("max_image_size", 150000,
                                     minval=10000, maxval=MAX_FETCH),
        interval_idle=config.getfloat("snapshot_interval", 60., minval=5.,
                                      maxval=3600.),
        interval_printing=config.getfloat("snapshot_interval_printing", 10.,
                                          minval=5., maxval=3600.),
        explicit=frozenset(o for o in SOURCE_OPTIONS
                           if config.get(o, None) is not None))


# Timelapses (timelapse.py)

@dataclass(frozen=True)
class TimelapseOptions:
    enabled: Optional[bool] = None      # None: auto
    max_bytes: int = 100 * 1024 * 1024


def read_timelapse_options(config) -> TimelapseOptions:
    text = config.get("timelapse", "auto").strip().lower()
    if text not in TRISTATE:
        raise config.error("Option 'timelapse' in section '%s' must be True,"
                           " False or auto" % (config.get_name(),))
    max_mb = config.getint("timelapse_max_mb", 100, minval=10,
                           maxval=100 * 1024)
    return TimelapseOptions(TRISTATE[text], max_mb * 1024 * 1024)


# Mainsail's webcam, from Moonraker (webcams.py)

DEFAULT_MOONRAKER = "http://127.0.0.1:7125"
NAME_RE = re.compile(r"[^\x00-\x1f\x7f]{1,64}")


@dataclass(frozen=True)
class WebcamOptions:
    name: str = ""                  # empty: the [polar_cloud] options only
    moonraker_url: str = DEFAULT_MOONRAKER


def read_webcam_options(config) -> WebcamOptions:
    section = config.get_name()
    name = config.get("webcam", "").strip()
    if name and not NAME_RE.fullmatch(name):
        raise config.error("Option 'webcam' in section '%s' must be the name"
                           " of a webcam in Mainsail (at most 64 characters)"
                           % (section,))
    url = config.get("moonraker_url", DEFAULT_MOONRAKER).strip().rstrip("/")
    problem = check_http_url(url)
    if problem:
        raise config.error("Option 'moonraker_url' in section '%s' %s"
                           % (section, problem))
    return WebcamOptions(name, url)


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
    timelapse: TimelapseOptions = TimelapseOptions()
    webcam: WebcamOptions = WebcamOptions()
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
        if not re.fullmatch(r"[A-Z][A-Z0-9_]{0,63}", name):
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
    if not re.fullmatch(r"[A-Za-z]{1,16}", manufacturer):
        raise error("Option 'manufacturer' in section 'polar_cloud' must be"
                    " a Polar manufacturer code such as 'kl'")
    printer_make = config.get("printer_make", "Cartesian").strip()
    if not re.fullmatch(r"[\w .+()/-]{1,64}", printer_make):
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
    macros = read_cloud_macros(config)
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
                   timelapse=read_timelapse_options(config),
                   webcam=read_webcam_options(config),
                   require_plate_clear=config.getboolean(
                       "require_plate_clear", False),
                   continuous_printing=config.getboolean(
                       "continuous_printing", False),
                   filament_change_macros=read_macro_list(
                       config, "filament_change_macros", "M600"),
                   web_url=web_url)
