"""worker.Worker: queued calls one after another on a thread that exists
only while there is work; worker.contained keeps a feature's bug in."""
from __future__ import annotations

import logging
import threading

from klippy_extras.polar_cloud import worker


def test_calls_run_in_order_and_the_thread_ends():
    stop = threading.Event()
    w = worker.Worker("polar_cloud-test", stop)
    gate = threading.Event()
    finished = threading.Event()
    results = []
    assert w.submit(gate.wait, 10., done=results.append)
    assert w.submit(lambda x: x * 2, 21, done=results.append)
    assert w.submit(lambda: None, done=lambda _r: finished.set())
    assert w.busy()
    gate.set()
    assert finished.wait(10.)
    w.join(10.)
    assert results == [True, 42]
    assert not w.busy() and w.thread is None


def test_a_failing_call_is_logged_once_and_the_next_runs(caplog):
    w = worker.Worker("polar_cloud-test", threading.Event())
    results = []
    done = threading.Event()

    def boom():
        raise ValueError("bug")
    with caplog.at_level(logging.ERROR, logger="polar_cloud"):
        w.submit(boom, done=results.append)
        w.submit(boom, done=results.append)
        w.submit(lambda: "ok", done=lambda r: (results.append(r), done.set()))
        assert done.wait(10.)
        w.join(10.)
    assert results == [None, None, "ok"]
    assert [r.message for r in caplog.records] == [
        "polar_cloud: polar_cloud-test failed"]


def test_nothing_runs_after_stop():
    stop = threading.Event()
    w = worker.Worker("polar_cloud-test", stop)
    gate = threading.Event()
    ran = []
    w.submit(gate.wait, 10.)
    w.submit(ran.append, "late")
    stop.set()
    gate.set()
    w.join(10.)
    assert ran == [] and w.thread is None
    assert not w.submit(ran.append, "later")


def test_contained_returns_the_fallback(caplog):
    class Feature:
        @worker.contained(fallback=lambda code: code)
        def status_code(self, code):
            raise KeyError("bug")

        @worker.contained()
        def describe(self):
            raise KeyError("bug")
    feature = Feature()
    with caplog.at_level(logging.ERROR, logger="polar_cloud"):
        assert feature.status_code(7) == 7
        assert feature.status_code(5) == 5
        assert feature.describe() is None
    assert [r.message for r in caplog.records] == [
        "polar_cloud: test_contained_returns_the_fallback.<locals>"
        ".Feature.status_code failed",
        "polar_cloud: test_contained_returns_the_fallback.<locals>"
        ".Feature.describe failed"]
