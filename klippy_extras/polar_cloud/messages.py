# Polar Cloud protocol: the messages the printer sends
#
# Field names are the protocol's own, spelled exactly (docs/protocol.md).
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

from dataclasses import dataclass

from .protocol import PROTOCOL_VERSION, bounded_count


def build_register(mfg: str, email: str, pin: str, public_key_pem: str,
                   mfg_sn: str, mac: str, machine_type: str,
                   printer_make: str) -> dict:
    return {
        "mfg": mfg, "email": email, "pin": pin,
        "publicKey": public_key_pem, "mfgSn": mfg_sn,
        "myInfo": {"MAC": mac, "protocolVersion": PROTOCOL_VERSION,
                   "machineType": machine_type, "printerType": printer_make},
    }


@dataclass(frozen=True)
class CameraHints:
    cam_url: str = ""
    cam_off: int = 1
    rotate_img: int = 0
    transform_img: int = 0


def build_hello(serial: str, signature: str, mac: str, mfg_sn: str,
                printer_make: str, version: str, local_ip: str,
                camera: CameraHints) -> dict:
    return {
        "serialNumber": serial, "signature": signature, "MAC": mac,
        "protocol": PROTOCOL_VERSION, "mfgSn": mfg_sn,
        "printerMake": printer_make, "version": version,
        "localIP": local_ip, "camUrl": camera.cam_url,
        "camOff": camera.cam_off, "rotateImg": camera.rotate_img,
        "transformImg": camera.transform_img,
    }


def build_job(serial: str, job_id: str, state: str, print_seconds: float,
              filament_used: float) -> dict:
    if state not in ("completed", "canceled"):
        raise ValueError("job state must be completed or canceled")
    return {"serialNumber": serial, "jobId": job_id, "state": state,
            "printSeconds": bounded_count(print_seconds),
            "filamentUsed": bounded_count(filament_used)}


def transform_bits(flip_h: bool, flip_v: bool, rotation: int) -> int:
    """transformImg as the OctoPrint client means it: 1 flip horizontal,
    2 flip vertical, 4 rotate 90 degrees counter-clockwise (OctoPrint's
    rotate90), the flips applied first.  rotation is clockwise, after the
    flips (camera.py, imaging.py): 270 clockwise is the counter-clockwise
    quarter turn; 180 is both flips; 90 clockwise is the counter-clockwise
    quarter turn after both flips."""
    bits = (1 if flip_h else 0) | (2 if flip_v else 0)
    if rotation in (90, 180):
        bits ^= 3
    if rotation in (90, 270):
        bits |= 4
    return bits


def rotate_bit(rotation: int) -> int:
    """rotateImg as Polar's own agent sends it: 1 when a rotation is set."""
    return 1 if rotation else 0
