"""A loopback HTTP webcam for the camera tests and the demo.

Answers every GET like mjpg-streamer: ``?action=stream`` gets an endless
MJPEG stream, anything else a snapshot served in the current ``mode``:

    ok          200 with the picture
    slow        the picture in small pieces with pauses (completes)
    stall       headers and half the picture, then silence until stopped
    endless     200 image/jpeg without a length, bytes forever
    mjpeg       200 multipart/x-mixed-replace stream forever
    truncated   full Content-Length, half the picture, then close
    html        200 text/html error page
    reset       close the connection without an answer
    404, 503    that status

    cam = CameraServer().start()
    cam.picture = noisy_jpeg(); cam.mode = "slow"
    ... cam.snapshot_url ...
    cam.stop()

Demo: ``python -m tests.testbed.camera_server --port 8080 [--live]``.
"""

from __future__ import annotations

import argparse
import io
import random
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from tests.testbed.servers import HttpServer, QuietHTTPServer

MODES = ("ok", "slow", "stall", "endless", "mjpeg", "truncated", "html", "reset")
BOUNDARY = "polarcamframe"


def quadrant_image(size: tuple[int, int] = (64, 48)):
    """Red top-left, green top-right, blue bottom-left, white bottom-right."""
    from PIL import Image

    w, h = size
    img = Image.new("RGB", size, (255, 255, 255))
    img.paste((255, 0, 0), (0, 0, w // 2, h // 2))
    img.paste((0, 255, 0), (w // 2, 0, w, h // 2))
    img.paste((0, 0, 255), (0, h // 2, w // 2, h))
    return img


def to_jpeg(img, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def quadrant_jpeg(size: tuple[int, int] = (64, 48), quality: int = 95) -> bytes:
    return to_jpeg(quadrant_image(size), quality)


def noisy_jpeg(
    size: tuple[int, int] = (1920, 1080), quality: int = 90, seed: int = 1
) -> bytes:
    """Random RGB noise: the worst case for JPEG (MBs at high quality)."""
    from PIL import Image

    noise = random.Random(seed).randbytes(size[0] * size[1] * 3)
    return to_jpeg(Image.frombytes("RGB", size, noise), quality)


# Reading pictures back: the quadrant picture's colours survive JPEG, so a
# flip or a rotation shows in which quadrant has which colour

def decode(data: bytes):
    """A JPEG as a Pillow image, loaded completely."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()          # raises on a truncated file
    return img


def color_at(img, fx, fy):
    return img.convert("RGB").getpixel((int(img.width * fx), int(img.height * fy)))


def near(rgb, want, tol=60):
    return all(abs(a - b) <= tol for a, b in zip(rgb, want))


RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def quadrants(img):
    """Colours at the centres of the top-left, top-right, bottom-left and
    bottom-right quadrants, snapped to the test colours."""
    out = []
    for fx, fy in ((.25, .25), (.75, .25), (.25, .75), (.75, .75)):
        rgb = color_at(img, fx, fy)
        match = [c for c in (RED, GREEN, BLUE, WHITE) if near(rgb, c)]
        assert len(match) == 1, rgb
        out.append(match[0])
    return tuple(out)


# A Python without Pillow (PYTHONPATH), for the camera's imaging child
NO_PILLOW = str(Path(__file__).parent / "no_pillow")


def live_jpeg(size: tuple[int, int] = (1280, 720)) -> bytes:
    """The quadrant picture with the time on it, for the demo."""
    from PIL import ImageDraw

    img = quadrant_image(size)
    ImageDraw.Draw(img).text((10, 10), time.strftime("%H:%M:%S"), fill=(0, 0, 0))
    return to_jpeg(img, 85)


class _Handler(BaseHTTPRequestHandler):
    server: QuietHTTPServer
    protocol_version = "HTTP/1.0"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        cam = self.server.owner
        with cam.cond:
            cam.hits += 1
            cam.cond.notify_all()
        mode = "mjpeg" if "action=stream" in self.path else cam.mode
        body = cam.render()
        try:
            self._answer(mode, body, cam)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _head(self, status: int, ctype: str, length: int | None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def _answer(self, mode: str, body: bytes, cam: CameraServer) -> None:
        if mode.isdigit():
            self._head(int(mode), "text/plain", 5)
            self.wfile.write(b"nope\n")
        elif mode == "reset":
            self.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            self.connection.close()
            self.close_connection = True
            self.wfile = io.BytesIO()  # finish() must not write to it
        elif mode == "html":
            page = b"<!DOCTYPE html><html><body>404: Not Found</body></html>"
            self._head(200, "text/html", len(page))
            self.wfile.write(page)
        elif mode == "ok":
            self._head(200, "image/jpeg", len(body))
            self.wfile.write(body)
        elif mode == "slow":
            self._head(200, "image/jpeg", len(body))
            step = max(1, len(body) // 10)
            for i in range(0, len(body), step):
                self.wfile.write(body[i : i + step])
                self.wfile.flush()
                if cam.stopping.wait(cam.slow_pause):
                    return
        elif mode in ("stall", "truncated"):
            self._head(200, "image/jpeg", len(body))
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            if mode == "stall":
                cam.stopping.wait(60)
        elif mode == "endless":
            self._head(200, "image/jpeg", None)
            junk = body + bytes(64 * 1024)
            while not cam.stopping.is_set():
                self.wfile.write(junk)
        elif mode == "mjpeg":
            self._head(200, "multipart/x-mixed-replace;boundary=" + BOUNDARY, None)
            while True:
                frame = cam.render()
                self.wfile.write(
                    b"--%s\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                    % (BOUNDARY.encode(), len(frame))
                    + frame
                    + b"\r\n"
                )
                self.wfile.flush()
                if cam.stopping.wait(cam.frame_interval):
                    return
        else:
            self._head(500, "text/plain", 0)


class CameraServer(HttpServer):
    handler_class = _Handler
    thread_name = "camera-server"

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self.mode = "ok"
        self.picture = quadrant_jpeg()
        self.live = False
        self.slow_pause = 0.02
        self.frame_interval = 0.5
        self.hits = 0
        self.cond = threading.Condition()

    def render(self) -> bytes:
        return live_jpeg() if self.live else self.picture

    def reset(self) -> None:
        self.mode = "ok"
        self.picture = quadrant_jpeg()
        self.live = False
        self.slow_pause = 0.02
        with self.cond:
            self.hits = 0

    @property
    def snapshot_url(self) -> str:
        return self.url + "/?action=snapshot"

    @property
    def stream_url(self) -> str:
        return self.url + "/?action=stream"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--mode", default="ok", help="one of: %s" % ", ".join(MODES))
    parser.add_argument("--live", action="store_true", help="draw the time on frames")
    parser.add_argument("--noise", action="store_true", help="serve 1080p noise")
    args = parser.parse_args()
    cam = CameraServer(args.host, args.port)
    cam.mode, cam.live = args.mode, args.live
    if args.noise:
        cam.picture = noisy_jpeg()
    cam.start()
    print("camera: %s  stream: %s" % (cam.snapshot_url, cam.stream_url), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        cam.stop()


if __name__ == "__main__":
    main()
