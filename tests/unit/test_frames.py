"""The frame store: under its cap over a long print, thinned oldest first,
waiting timelapses giving way, nothing written once stopped."""
from __future__ import annotations

import logging
import os
import random
import threading
import time

import pytest

from klippy_extras.polar_cloud import (
    frames,
)

SERIAL = "KL000001"


def add_frames(store, job_id, count, rng, low=20_000, high=60_000):
    """count frames of random sizes; the total after each one."""
    totals = []
    for _ in range(count):
        path = store.new_frame(job_id)
        with open(path, "wb") as f:
            f.write(b"\xff\xd8" + bytes(rng.randrange(low, high)))
        store.added(job_id, path)
        totals.append(store.total())
    return totals


def test_a_long_print_stays_under_the_cap(tmp_path):
    cap = 8 * 1024 * 1024
    store = frames.FrameStore(str(tmp_path), cap, threading.Event())
    store.begin("job-1")
    totals = add_frames(store, "job-1", 3000, random.Random(1))
    # 3000 frames of 40 KB on average would be 117 MB
    assert max(totals) <= cap
    names = sorted(n for n in os.listdir(tmp_path / "timelapse" / "job-1")
                   if frames.FRAME_RE.match(n))
    assert store.frame_count("job-1") == len(names) > 100
    index = [int(n[1:9]) for n in names]
    # The first and the last frame stay; the oldest are the sparsest
    assert index[0] == 1 and index[-1] == 3000
    gaps = [b - a for a, b in zip(index, index[1:])]
    quarter = len(gaps) // 4
    assert sum(gaps[:quarter]) / quarter > sum(gaps[-quarter:]) / quarter
    assert max(gaps[-quarter:]) <= max(gaps[:quarter])
    print("kept %d of 3000 frames, %.1f MB, cap %.1f MB" % (
        len(names), store.total() / 2 ** 20, cap / 2 ** 20))


def test_thinning_drops_every_other_frame_oldest_first(tmp_path):
    store = frames.FrameStore(str(tmp_path), 10 ** 9, threading.Event())
    store.begin("j")
    add_frames(store, "j", 10, random.Random(2), 1000, 1001)
    assert store.thin("j", 8 * 1002) == 2
    kept = sorted(int(n[1:9]) for n in os.listdir(tmp_path / "timelapse" / "j")
                  if frames.FRAME_RE.match(n))
    assert kept == [1, 3, 5, 6, 7, 8, 9, 10]


def test_waiting_timelapses_give_way_to_the_recording(tmp_path, caplog):
    cap = 4 * 1024 * 1024
    store = frames.FrameStore(str(tmp_path), cap, threading.Event())
    rng = random.Random(3)
    for old in ("old-1", "old-2"):
        store.begin(old)
        add_frames(store, old, 40, rng)       # 1.6 MB each
        store.update_meta(old, state="completed", completed=time.time())
    store.protected = "old-2"                 # its video is being made
    store.begin("new")
    with caplog.at_level(logging.INFO, logger="polar_cloud"):
        totals = add_frames(store, "new", 200, rng)
    assert max(totals) <= cap
    assert store.job_ids() == ["new", "old-2"]
    assert "timelapse of job old-1 dropped to make room" in caplog.text


def test_a_stopped_store_writes_nothing(tmp_path):
    stop = threading.Event()
    store = frames.FrameStore(str(tmp_path), 10 ** 9, stop)
    store.begin("j")
    stop.set()
    with pytest.raises(frames.Stopped):
        store.begin("k")
    with pytest.raises(frames.Stopped):
        store.remove("j")
    assert store.job_ids() == ["j"]
    with pytest.raises(ValueError):
        store.folder("../x")
