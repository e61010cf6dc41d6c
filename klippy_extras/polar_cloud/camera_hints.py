# How the hello describes the camera: its stream URL as seen from the LAN,
# and the flips and rotation for Polar's page (docs/protocol.md, 2.4)
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import urllib.parse

from . import messages, netpolicy
from .options import CameraOptions


def lan_stream_url(stream_url: str, local_ip: str) -> str:
    """The stream URL as seen from the LAN (Polar's page opens it there)."""
    if not stream_url:
        return ""
    host = "[%s]" % (local_ip,) if ":" in local_ip else local_ip
    if stream_url.startswith("/"):
        return "http://%s%s" % (host, stream_url)
    parts = urllib.parse.urlsplit(stream_url)
    if parts.hostname and netpolicy.is_loopback_host(parts.hostname):
        netloc = host if parts.port is None else "%s:%d" % (host, parts.port)
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return stream_url


def camera_hints(opts: CameraOptions, local_ip: str,
                 available: bool) -> messages.CameraHints:
    if opts.enabled is False or (opts.enabled is None and not available):
        return messages.CameraHints()
    # transformImg with the OctoPrint client's meaning, rotateImg with
    # Polar's agent's (docs/protocol.md, section 2.4)
    return messages.CameraHints(
        cam_url=lan_stream_url(opts.stream_url, local_ip), cam_off=0,
        rotate_img=messages.rotate_bit(opts.rotation),
        transform_img=messages.transform_bits(
            opts.flip_horizontal, opts.flip_vertical, opts.rotation))
