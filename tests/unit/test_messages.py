"""What the printer sends: message shapes and the camera transform bits."""

import pytest

from klippy_extras.polar_cloud import messages
from klippy_extras.polar_cloud import protocol as p
from tests.unit.fakes import HUGE, HUGE_INT, INF, NAN, assert_sendable


@pytest.mark.parametrize("bad", [INF, -INF, NAN, HUGE, HUGE_INT])
def test_build_job_survives_non_finite_numbers(bad):
    msg = messages.build_job("KL1", "j1", "completed", bad, bad)
    assert_sendable(msg)
    assert msg["state"] == "completed"
    big = messages.build_job("KL1", "j1", "canceled", 1e300, 1e300)
    assert big["printSeconds"] == big["filamentUsed"] == p.MAX_COUNT


# transformImg as the OctoPrint client sends it: flipH 1, flipV 2, and its
# rotate90 (OctoPrint's 90 degrees counter-clockwise) 4.  Our rotation is
# clockwise, so 90 and 270 must not come out the other way round.
@pytest.mark.parametrize("flip_h,flip_v,rotation,bits", [
    (False, False, 0, 0), (True, False, 0, 1), (False, True, 0, 2),
    (True, True, 0, 3),
    (False, False, 90, 7), (True, False, 90, 6), (False, True, 90, 5),
    (True, True, 90, 4),
    (False, False, 180, 3), (True, False, 180, 2), (False, True, 180, 1),
    (True, True, 180, 0),
    (False, False, 270, 4), (True, False, 270, 5), (False, True, 270, 6),
    (True, True, 270, 7),
])
def test_transform_bits(flip_h, flip_v, rotation, bits):
    assert messages.transform_bits(flip_h, flip_v, rotation) == bits
    # rotateImg as Polar's agent sends it: any rotation
    assert messages.rotate_bit(rotation) == (1 if rotation else 0)


@pytest.mark.parametrize("rotation", [0, 90, 180, 270])
@pytest.mark.parametrize("flip_v", [False, True])
@pytest.mark.parametrize("flip_h", [False, True])
def test_transform_bits_describe_the_snapshot(flip_h, flip_v, rotation):
    """The view the bits ask for, applied the way the OctoPrint client
    applies them (flips, then Pillow's ROTATE_90, counter-clockwise), is
    the very picture imaging.py uploads."""
    Image = pytest.importorskip("PIL.Image")
    from klippy_extras.polar_cloud import imaging
    src = Image.new("L", (3, 2))
    src.putdata([1, 2, 3, 4, 5, 6])     # no symmetry: every view differs
    ours = imaging._transform(src, Image, imaging.Transform(
        flip_h, flip_v, rotation))
    bits = messages.transform_bits(flip_h, flip_v, rotation)
    ops = Image.Transpose
    view = src
    if bits & 1:
        view = view.transpose(ops.FLIP_LEFT_RIGHT)
    if bits & 2:
        view = view.transpose(ops.FLIP_TOP_BOTTOM)
    if bits & 4:
        view = view.transpose(ops.ROTATE_90)
    assert (view.size, view.tobytes()) == (ours.size, ours.tobytes())
