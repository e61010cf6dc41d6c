"""The snapshot image work (imaging.py): every upload is complete,
decodable and within the limit; the script as camera.py runs it (a child
process, without Pillow too); its priority."""
import io
import os
import random
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from klippy_extras.polar_cloud import imaging, imagingchild
from tests.testbed.camera_server import (
    BLUE,
    GREEN,
    NO_PILLOW,
    RED,
    WHITE,
    decode,
    noisy_jpeg,
    quadrant_image,
    quadrant_jpeg,
    quadrants,
    to_jpeg,
)

# The invariant behind every upload: complete, decodable, within the limit

@settings(max_examples=25, deadline=None)
@given(width=st.integers(16, 800), height=st.integers(16, 600),
       noise=st.integers(0, 255), quality=st.sampled_from([50, 75, 95]),
       limit=st.integers(1024, 200000),
       rotation=st.sampled_from([0, 90, 180, 270]),
       flip=st.booleans(), seed=st.integers(0, 1000))
def test_process_jpeg_fits_or_refuses(width, height, noise, quality, limit,
                                      rotation, flip, seed):
    rnd = random.Random(seed)
    base = quadrant_image((width, height))
    grain = Image.frombytes("RGB", (width, height),
                            rnd.randbytes(width * height * 3))
    data = to_jpeg(Image.blend(base, grain, noise / 255.), quality)
    opts = imaging.Transform(rotation=rotation, flip_horizontal=flip)
    try:
        out = imaging.process_jpeg(data, limit, opts, Image)
    except imaging.CannotShrink as e:
        assert "cannot shrink" in str(e)
        return
    assert len(out) <= limit
    assert out.startswith(b"\xff\xd8\xff") and out.endswith(b"\xff\xd9")
    img = decode(out)
    turned = rotation in (90, 270)
    w, h = (height, width) if turned else (width, height)
    if (img.width, img.height) != (w, h):               # scaled: same shape
        assert abs(img.width / img.height - w / h) < .05 + 2. / min(img.size)


# imaging.py run as a script, as imagingchild.py runs it

def run_imaging(data, limit=150000, env=None, cwd=None, **transform):
    header = imagingchild.request(limit, imaging.Transform(**transform))
    return subprocess.run([sys.executable, imaging.SCRIPT], input=header + data,
                          capture_output=True, timeout=60, env=env, cwd=cwd)


def test_imaging_script(tmp_path):
    picture = quadrant_jpeg((640, 480))
    # Run by path from elsewhere: no package, no relative imports
    done = run_imaging(picture, cwd=tmp_path)
    assert (done.returncode, done.stderr) == (0, b"")
    assert done.stdout == picture                       # fits: as it is
    done = run_imaging(picture, flip_horizontal=True, rotation=90)
    assert (done.returncode, done.stderr) == (0, b"")
    img = decode(done.stdout)
    assert img.size == (480, 640)
    assert quadrants(img) == (WHITE, GREEN, BLUE, RED)
    noisy = noisy_jpeg((800, 600))
    done = run_imaging(noisy, limit=40000, flip_vertical=True)
    assert done.returncode == 0 and len(done.stdout) <= 40000
    assert decode(done.stdout).width < 800              # shrunk
    done = run_imaging(picture, limit=1024)
    assert done.returncode == imaging.EXIT_CANNOT_SHRINK and done.stdout == b""
    assert done.stderr == b"cannot shrink the snapshot to 1024 bytes; skipped\n"


@pytest.mark.parametrize("data,code,error", [
    (quadrant_jpeg((640, 480))[:3000], imaging.EXIT_BAD_JPEG,
     b"broken JPEG from the camera ("),
    ("png", imaging.EXIT_BAD_JPEG, b"not a JPEG image\n"),
    (b"", imaging.EXIT_BAD_JPEG, b"broken JPEG from the camera ("),
])
def test_imaging_script_refuses_bad_pictures(data, code, error):
    if data == "png":
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, "PNG")
        data = buf.getvalue()
    done = run_imaging(data, limit=1000000)
    assert done.returncode == code and done.stdout == b""
    assert done.stderr.startswith(error) and done.stderr.count(b"\n") == 1


def test_imaging_script_bad_header_and_no_pillow():
    done = subprocess.run([sys.executable, imaging.SCRIPT],
                          input=b'{"limit": 0}\n\xff\xd8', capture_output=True)
    assert done.returncode == imaging.EXIT_BAD_REQUEST
    assert done.stderr.startswith(b"bad request header")
    # Without Pillow: a frame that fits goes out as it is, else a reason
    env = dict(os.environ, PYTHONPATH=NO_PILLOW)
    picture = quadrant_jpeg()
    done = run_imaging(picture, env=env)
    assert done.returncode == imaging.EXIT_OK and done.stdout == picture
    done = run_imaging(picture, env=env, rotation=90)
    assert done.returncode == imaging.EXIT_NO_PILLOW
    assert done.stderr == (b"Pillow is not installed (needed to shrink or"
                           b" rotate the snapshot)\n")
    done = run_imaging(picture[:-2], env=env)
    assert done.returncode == imaging.EXIT_BAD_JPEG
    assert done.stderr == b"incomplete JPEG from the camera\n"


def test_imaging_child_priority():
    code = ("import os, sys\n"
            "sys.path.insert(0, %r)\n"
            "import pacing\n"
            "pacing.lower_priority()\n"
            "print(os.sched_getscheduler(0) == os.SCHED_IDLE,"
            " os.getpriority(os.PRIO_PROCESS, 0))\n"
            % (os.path.dirname(imaging.SCRIPT),))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, check=True)
    assert done.stdout.split() == ["True", "19"]


def test_imaging_child_paces_itself_and_gives_the_same_jpeg(tmp_path):
    """The child paces its CPU time (pacing.py): the pacer runs for every
    block of a 1080p frame's decode and encode; the JPEG is the one the
    same work gives unpaced."""
    data = noisy_jpeg((1920, 1080))
    expected = imaging.process_jpeg(data, 150000, imaging.Transform(), Image)
    out = tmp_path / "frame.jpg"
    stdin = imagingchild.request(150000, imaging.Transform(), out=str(out))
    # imaging.py as its own __main__, then a look at its pacer
    code = ("import os, sys\n"
            "def leave(code):\n"           # pacing.leave's os._exit
            "    raise SystemExit(code)\n"
            "os._exit = leave\n"
            "script = sys.argv[1]\n"
            "g = {'__name__': '__main__', '__file__': script}\n"
            "try:\n"
            "    exec(compile(open(script).read(), script, 'exec'), g)\n"
            "except SystemExit as e:\n"
            "    sys.stderr.write('exit %s\\n' % (e.code,))\n"
            "sys.stderr.write('calls %d\\n' % (g['PACER'].calls,))\n")
    done = subprocess.run([sys.executable, "-c", code, imaging.SCRIPT],
                          input=stdin + data, capture_output=True, timeout=60)
    exit_line, calls_line = done.stderr.decode().splitlines()
    assert exit_line == "exit 0"
    assert out.read_bytes() == expected
    assert len(expected) <= 150000 and decode(expected).width < 1920
    assert int(calls_line.split()[1]) > len(data) // 4096
