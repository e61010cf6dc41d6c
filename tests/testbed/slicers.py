"""G-code from real slicers (Debian's prusa-slicer and slic3r, run headless
from the command line) for a small cube on the test printer's bed.

Start G-code is written the way Klipper users write it: macros in lower
or mixed case, hidden `_` macros, Klipper commands (see SLICERS).  Neither
slicer's command line writes thumbnails (PrusaSlicer 2.5 renders them only
in its GUI), so `with_thumbnail` adds a block in PrusaSlicer's own format.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
import zlib
from pathlib import Path

# The test printer's bed is 200 x 200 mm (printer_cfg.py)
BED = "0x0,200x0,200x200,0x200"
CENTER = "100,100"
PRUSA_START = "\n".join([
    "print_start EXTRUDER=[first_layer_temperature]"
    " BED=[first_layer_bed_temperature]",
    "_HEAT_SOAK",
    "EXCLUDE_OBJECT_DEFINE NAME=cube CENTER=100,100"
    " POLYGON={\"[[95,95],[105,95],[105,105],[95,105]]\"}",
    "SET_PRINT_STATS_INFO TOTAL_LAYER=[total_layer_count]",
    "EXCLUDE_OBJECT_START NAME=cube",
])
PRUSA_END = "EXCLUDE_OBJECT_END NAME=cube\nM104 S0\nM140 S0\nM84"
SLIC3R_START = "\n".join([
    "Print_Start EXTRUDER=[first_layer_temperature]"
    " BED=[first_layer_bed_temperature]",
    "set_pressure_advance ADVANCE=0.04",
])

SLICERS = {
    "prusa-slicer": lambda stl, out: [
        "prusa-slicer", "--export-gcode", "--loglevel", "1",
        "--gcode-flavor", "marlin2", "--remaining-times",
        "--bed-shape", BED, "--center", CENTER,
        "--first-layer-temperature", "200", "--temperature", "200",
        "--first-layer-bed-temperature", "50", "--bed-temperature", "50",
        "--start-gcode", PRUSA_START, "--end-gcode", PRUSA_END,
        "--before-layer-gcode", "SET_PRINT_STATS_INFO"
        " CURRENT_LAYER={layer_num + 1}",
        "--thumbnails", "32x32",       # written only by the GUI in 2.5
        "--output", str(out), str(stl)],
    "slic3r": lambda stl, out: [
        "slic3r", "--gcode-flavor", "reprap",
        "--bed-shape", BED, "--print-center", CENTER,
        "--first-layer-temperature", "200", "--temperature", "200",
        "--first-layer-bed-temperature", "50", "--bed-temperature", "50",
        "--start-gcode", SLIC3R_START,
        "--output", str(out), str(stl)],
}
PRUSA_3MF = lambda stl, out: [  # noqa: E731
    "prusa-slicer", "--export-3mf", "--loglevel", "1",
    "--output", str(out), str(stl)]


def write_cube_stl(path: Path, sx: float = 10., sy: float = 10.,
                   sz: float = 2.) -> Path:
    """An ASCII STL of an sx x sy x sz mm box (12 triangles)."""
    def v(x: int, y: int, z: int) -> tuple[float, float, float]:
        return (x * sx, y * sy, z * sz)
    quads = [  # counter-clockwise seen from outside
        ((0, 0, 0), (0, 1, 0), (1, 1, 0), (1, 0, 0), (0, 0, -1)),
        ((0, 0, 1), (1, 0, 1), (1, 1, 1), (0, 1, 1), (0, 0, 1)),
        ((0, 0, 0), (1, 0, 0), (1, 0, 1), (0, 0, 1), (0, -1, 0)),
        ((0, 1, 0), (0, 1, 1), (1, 1, 1), (1, 1, 0), (0, 1, 0)),
        ((0, 0, 0), (0, 0, 1), (0, 1, 1), (0, 1, 0), (-1, 0, 0)),
        ((1, 0, 0), (1, 1, 0), (1, 1, 1), (1, 0, 1), (1, 0, 0)),
    ]
    lines = ["solid cube"]
    for a, b, c, d, n in quads:
        for tri in ((a, b, c), (a, c, d)):
            lines.append(" facet normal %d %d %d" % n)
            lines.append("  outer loop")
            lines += ["   vertex %g %g %g" % v(*p) for p in tri]
            lines += ["  endloop", " endfacet"]
    lines.append("endsolid cube")
    path.write_text("\n".join(lines) + "\n")
    return path


def run_slicer(argv: list[str], out: Path) -> float:
    """Run a slicer; return its wall time.  Fails loudly when missing."""
    if shutil.which(argv[0]) is None:
        raise RuntimeError("%s is not installed (the test setup installs it"
                           " from Debian: see .ci/run)" % (argv[0],))
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL,
                          env=dict(os.environ, HOME=str(out.parent)))
    took = time.monotonic() - started
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError("%s failed (%d): %s" % (
            argv[0], proc.returncode, (proc.stderr or proc.stdout)[-2000:]))
    return took


def slice_cube(slicer: str, workdir: Path) -> tuple[bytes, float]:
    """(G-code, seconds) for the cube sliced by `slicer`."""
    stl = write_cube_stl(workdir / "cube.stl")
    out = workdir / ("cube-%s.gcode" % (slicer,))
    took = run_slicer(SLICERS[slicer](stl, out), out)
    return out.read_bytes(), took


def export_3mf(workdir: Path) -> bytes:
    """The cube as a 3MF project written by PrusaSlicer."""
    stl = write_cube_stl(workdir / "cube.stl")
    out = workdir / "cube.3mf"
    run_slicer(PRUSA_3MF(stl, out), out)
    return out.read_bytes()


def _png(width: int, height: int, seed: int = 1) -> bytes:
    """A noisy RGB PNG (incompressible, like a photo-real thumbnail)."""
    import random
    rng = random.Random(seed)
    raw = b"".join(b"\0" + rng.randbytes(width * 3) for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return (len(data).to_bytes(4, "big") + body
                + zlib.crc32(body).to_bytes(4, "big"))
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") \
        + bytes([8, 2, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def thumbnail_block(width: int = 300, height: int = 300) -> bytes:
    """A thumbnail as PrusaSlicer's GUI writes it: base64 in '; ' comment
    lines of 78 characters (300x300 noise: about 4,700 lines)."""
    data = base64.b64encode(_png(width, height)).decode()
    lines = ["; thumbnail begin %dx%d %d" % (width, height, len(data))]
    lines += ["; " + data[i:i + 78] for i in range(0, len(data), 78)]
    lines += ["; thumbnail end", ";", ""]
    return "\n".join(lines).encode()


def with_thumbnail(gcode: bytes, **kw) -> bytes:
    """Insert a thumbnail block after the first line, where PrusaSlicer
    puts it."""
    first, _, rest = gcode.partition(b"\n")
    return first + b"\n\n" + thumbnail_block(**kw) + rest
