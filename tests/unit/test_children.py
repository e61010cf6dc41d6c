"""children.py, the one runner of helper children: stdin from memory,
idle priority, killed on its time limit and when its owner stops."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from klippy_extras.polar_cloud import children
from tests.testbed.helpers import poll_until

ECHO = "import sys; sys.stdout.write(sys.stdin.read().upper())"
SCHED = "import os; print(os.sched_getscheduler(0), os.getpriority(0, 0))"
FOREVER = "import time\nwhile True: time.sleep(1)"


def run(kids, code, stdin=subprocess.DEVNULL, timeout=30.):
    return kids.run([sys.executable, "-I", "-c", code], timeout, "a test",
                    stdin=stdin)


def test_stdin_comes_from_memory():
    kids = children.Children(threading.Event())
    with children.input_file(b"hello") as stdin:
        code, out, err = run(kids, ECHO, stdin)
    assert (code, out, err) == (0, b"HELLO", "")


def test_a_child_runs_at_idle_priority():
    code, out, _err = run(children.Children(threading.Event()), SCHED)
    policy, nice = out.split()
    assert int(policy) == getattr(os, "SCHED_IDLE", -1) \
        or int(nice) == 19


def test_the_time_limit_kills_the_child():
    kids = children.Children(threading.Event())
    with pytest.raises(children.ChildTimeout):
        run(kids, FOREVER, timeout=.5)
    assert kids.procs == set()


def test_kill_all_ends_a_running_child_at_once():
    stop = threading.Event()
    kids = children.Children(stop)
    outcome: list = []

    def wait():
        try:
            run(kids, FOREVER, timeout=600.)
        except children.ChildStopped as e:
            outcome.append(e)
    waiter = threading.Thread(target=wait)
    waiter.start()

    poll_until(lambda: kids.procs, 10, "the child")
    stop.set()
    kids.kill_all()
    waiter.join(30.)
    assert not waiter.is_alive() and len(outcome) == 1
    assert kids.procs == set()
