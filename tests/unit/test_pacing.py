"""pacing.py, the helper children's CPU pacer: its arithmetic on a fake
clock (no timing here), and the quota it finds in a cgroup tree."""
from __future__ import annotations

import io
import random

import pytest

from klippy_extras.polar_cloud import pacing


class Clock:
    def __init__(self):
        self.wall = 100.
        self.cpu = 5.
        self.sleeps: list[float] = []
    def monotonic(self):
        return self.wall
    def process_time(self):
        return self.cpu
    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.wall += seconds


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(pacing.time, "monotonic", c.monotonic)
    monkeypatch.setattr(pacing.time, "process_time", c.process_time)
    monkeypatch.setattr(pacing.time, "sleep", c.sleep)
    return c


def test_the_pacer_keeps_to_its_share(clock):
    pacer = pacing.CpuPacer(share=.1, burst=.001)
    # Within the burst: no pause
    clock.cpu += .0008
    clock.wall += .0008
    pacer()
    assert clock.sleeps == []
    # 5 ms of CPU at once: what is left of the bucket (0.2 ms, refilled up
    # to its size) is spent, the rest paid for by a pause ten times as long
    clock.cpu += .005
    clock.wall += .005
    pacer()
    assert clock.sleeps == [pytest.approx((.005 - .0007) / .1)]
    # Over a long run, CPU time / wall time stays at the share
    start_wall, start_cpu = clock.wall, clock.cpu
    for _ in range(1000):
        clock.cpu += .0003
        clock.wall += .0003
        pacer()
    share = (clock.cpu - start_cpu) / (clock.wall - start_wall)
    assert share == pytest.approx(.1, rel=.02)


def test_idle_time_does_not_save_up_a_burst(clock):
    pacer = pacing.CpuPacer(share=.1, burst=.001)
    clock.wall += 60.           # a minute waiting for the network
    pacer()
    clock.cpu += .003
    clock.wall += .003
    pacer()
    # only the burst was free: the rest is paid for at once
    assert clock.sleeps == [pytest.approx((.003 - .001) / .1)]


def test_imports_are_paced(clock):
    pacer = pacing.CpuPacer(share=.1, burst=.001)
    finder = pacing.PacedImports(pacer)
    clock.cpu += .01
    clock.wall += .01
    assert finder.find_spec("json") is None
    assert clock.sleeps


def fake_cgroup(tmp_path, monkeypatch, proc_self: str, files: dict) -> None:
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    real = pacing._read
    monkeypatch.setattr(pacing, "CGROUP_ROOTS", (str(root),))
    monkeypatch.setattr(pacing, "_read", lambda p: proc_self if
                        p == "/proc/self/cgroup" else real(p))


def test_a_v1_quota_is_found_in_a_parent(tmp_path, monkeypatch):
    fake_cgroup(tmp_path, monkeypatch, "4:cpu,cpuacct:/klipper/child\n", {
        "cpu.cfs_quota_us": "-1", "cpu.cfs_period_us": "100000",
        "klipper/cpu.cfs_quota_us": "1500",
        "klipper/cpu.cfs_period_us": "5000",
        "klipper/child/cpu.cfs_quota_us": "-1",
        "klipper/child/cpu.cfs_period_us": "100000"})
    assert pacing.cgroup_quota() == (pytest.approx(.3), .005)
    pacer = pacing.CpuPacer.for_this_process()
    assert pacer.share == pytest.approx(.3 * pacing.QUOTA_SHARE)
    assert pacer.burst == pytest.approx(.3 * pacing.QUOTA_SHARE * .005)


def test_a_v2_quota_and_none(tmp_path, monkeypatch):
    fake_cgroup(tmp_path, monkeypatch, "0::/system.slice/klipper.service\n",
                {"system.slice/cpu.max": "max 100000",
                 "system.slice/klipper.service/cpu.max": "50000 100000"})
    assert pacing.cgroup_quota() == (pytest.approx(.5), .1)
    fake_cgroup(tmp_path, monkeypatch, "0::/user.slice\n",
                {"user.slice/cpu.max": "max 100000"})
    assert pacing.cgroup_quota() is None
    pacer = pacing.CpuPacer.for_this_process()
    assert (pacer.share, pacer.burst) == (pacing.MAX_SHARE, pacing.MAX_BURST)


class Counter:
    def __init__(self):
        self.calls = 0
    def __call__(self):
        self.calls += 1


def test_pillow_decodes_and_encodes_block_by_block(monkeypatch):
    """The imaging child's Pillow: the pacer runs after every block of a
    1080p frame's decode and encode, and the pictures are the same."""
    from PIL import Image, ImageFile

    from tests.testbed.camera_server import noisy_jpeg
    data = noisy_jpeg((1920, 1080))
    plain = Image.open(io.BytesIO(data))
    plain.load()
    expected = io.BytesIO()
    plain.save(expected, "JPEG", quality=85)
    # restored after the test: pace_pillow replaces them
    for name in ("_getdecoder", "_getencoder"):
        monkeypatch.setattr(Image, name, getattr(Image, name))
    monkeypatch.setattr(ImageFile, "MAXBLOCK", ImageFile.MAXBLOCK)
    pacer = Counter()
    pacing.pace_pillow(Image, ImageFile, pacer)
    pacing.pace_pillow(Image, ImageFile, pacer)         # once is enough
    img = Image.open(io.BytesIO(data))
    img.load()
    assert pacer.calls >= len(data) // pacing.PILLOW_BLOCK
    assert img.tobytes() == plain.tobytes()
    decoded, out = pacer.calls, io.BytesIO()
    img.save(out, "JPEG", quality=85)
    # an encoder's block is at least 4 bytes per pixel of a row
    assert pacer.calls - decoded >= len(out.getvalue()) // (4 * 1920)
    assert pacer.calls - decoded > 10
    assert out.getvalue() == expected.getvalue()


def test_the_resize_runs_in_paced_strips():
    """The shrink's resize, strip by strip: the same picture as one resize
    (a stray rounding difference at most), the pacer after every strip."""
    from PIL import Image

    from tests.testbed.camera_server import quadrant_image
    src = Image.frombytes("RGB", (960, 540), random.Random(3).randbytes(
        960 * 540 * 3))
    resample = Image.Resampling.BILINEAR
    for img, size in ((src, (607, 341)), (quadrant_image((333, 217)),
                                          (301, 150))):
        pacer = Counter()
        out = pacing.resize(img, size, resample, Image, pacer)
        whole = img.resize(size, resample).tobytes()
        assert out.size == size and out.mode == img.mode
        assert pacer.calls == -(-size[1] // pacing.RESIZE_ROWS)
        differing = sum(a != b for a, b in zip(out.tobytes(), whole))
        assert differing <= len(whole) // 1000
    assert pacing.resize(src, (100, 50), resample, Image).size == (100, 50)


@pytest.mark.parametrize("method", ["FLIP_LEFT_RIGHT", "FLIP_TOP_BOTTOM",
                                    "ROTATE_90", "ROTATE_180", "ROTATE_270"])
def test_transposes_run_in_paced_strips(method):
    from PIL import Image
    img = Image.frombytes("RGB", (333, 217), random.Random(5).randbytes(
        333 * 217 * 3))
    op = getattr(Image.Transpose, method)
    pacer = Counter()
    out = pacing.transpose(img, op, Image, pacer)
    assert out.size == img.transpose(op).size
    assert out.tobytes() == img.transpose(op).tobytes()        # the same
    assert pacer.calls == -(-217 // pacing.TRANSPOSE_ROWS)


def test_ticks_call_the_pacer_in_a_stretch_of_python():
    """tick(): the pacer runs every 0.5 ms of wall time while Python runs,
    in the middle of a function that never calls it."""
    import signal
    import time
    before = signal.getsignal(signal.SIGALRM)
    pacer = pacing.CpuPacer(share=1., burst=1.)
    try:
        pacing.tick(pacer)
        end = time.monotonic() + .05
        while time.monotonic() < end:
            pass
    finally:
        pacing.stop_ticks(pacer)
        signal.signal(signal.SIGALRM, before)
    assert pacer.calls >= 10        # about 100


def test_the_share_gives_way_while_the_group_is_throttled(
        tmp_path, monkeypatch, clock):
    fake_cgroup(tmp_path, monkeypatch, "0::/klipper\n",
                {"klipper/cpu.max": "1500 5000",
                 "klipper/cpu.stat": "nr_periods 10\nnr_throttled 2\n"})
    stat = tmp_path / "cgroup" / "klipper" / "cpu.stat"
    pacer = pacing.CpuPacer.for_this_process()
    full = pacer.share
    assert full == pytest.approx(.3 * pacing.QUOTA_SHARE)

    def look(throttled: int) -> float:
        stat.write_text("nr_periods 99\nnr_throttled %d\n" % (throttled,))
        clock.wall += pacing.LOOK_EVERY
        pacer()
        return pacer.share
    assert look(3) == pytest.approx(max(full / 2, full * pacing.MIN_SHARE))
    for n in range(4, 20):
        look(n)
    assert pacer.share == pytest.approx(full * pacing.MIN_SHARE)
    assert look(19) == pytest.approx(full * (pacing.MIN_SHARE
                                             + pacing.GROWTH))
    # Not read again before LOOK_EVERY has passed
    stat.write_text("nr_throttled 50\n")
    pacer()
    assert pacer.share == pytest.approx(full * (pacing.MIN_SHARE
                                                + pacing.GROWTH))
    for _ in range(100):
        look(50)
    assert pacer.share == pytest.approx(full)


def test_without_a_quota_the_share_stays(tmp_path, monkeypatch, clock):
    fake_cgroup(tmp_path, monkeypatch, "0::/user.slice\n",
                {"user.slice/cpu.max": "max 100000",
                 "user.slice/cpu.stat": "nr_throttled 1\n"})
    stat = tmp_path / "cgroup" / "user.slice" / "cpu.stat"
    pacer = pacing.CpuPacer.for_this_process()
    for n in range(2, 12):
        stat.write_text("nr_throttled %d\n" % (n,))
        clock.wall += pacing.LOOK_EVERY
        pacer()
    assert pacer.share == pacing.MAX_SHARE
