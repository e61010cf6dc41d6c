"""How the hello describes the camera (camera_hints.py)."""
import pytest

from klippy_extras.polar_cloud import camera_hints as hints_mod
from klippy_extras.polar_cloud import messages
from klippy_extras.polar_cloud import options as cfg


@pytest.mark.parametrize("stream,ip,expected", [
    ("/webcam/?action=stream", "192.168.1.20", "http://192.168.1.20/webcam/?action=stream"),
    ("http://127.0.0.1:8080/?action=stream", "192.168.1.20",
     "http://192.168.1.20:8080/?action=stream"),
    ("http://localhost/webcam/", "10.0.0.5", "http://10.0.0.5/webcam/"),
    ("http://[::1]:8080/s", "fd00::5", "http://[fd00::5]:8080/s"),
    ("https://cam.example.com/live", "192.168.1.20", "https://cam.example.com/live"),
    ("", "192.168.1.20", ""),
])
def test_lan_stream_url(stream, ip, expected):
    assert hints_mod.lan_stream_url(stream, ip) == expected


def test_camera_hints():
    off = messages.CameraHints()
    ip = "10.0.0.2"
    assert hints_mod.camera_hints(cfg.CameraOptions(enabled=False), ip, True) == off
    assert hints_mod.camera_hints(cfg.CameraOptions(), ip, False) == off
    hints = hints_mod.camera_hints(cfg.CameraOptions(), ip, True)
    assert hints == messages.CameraHints(
        "http://10.0.0.2/webcam/?action=stream", 0, 0, 0)
    opts = cfg.CameraOptions(enabled=True, flip_horizontal=True, rotation=90)
    hints = hints_mod.camera_hints(opts, "10.0.0.2", False)
    assert hints.cam_off == 0
    assert hints.transform_img == messages.transform_bits(True, False, 90) == 6
    msg = messages.build_hello("S", "sig", "MAC", "KL-1", "Make", "1", ip, hints)
    assert msg["camOff"] == 0 and msg["transformImg"] == 6 and msg["rotateImg"] == 1
    flips = cfg.CameraOptions(enabled=True, flip_vertical=True)
    assert hints_mod.camera_hints(flips, ip, True).rotate_img == 0
