"""The cloud G-code queue: one script in flight, the rest coalesced."""
from __future__ import annotations

from klippy_extras.polar_cloud.gcode_queue import OVERFLOW_ERROR, GcodeQueue


class FakeReactor:
    """Stands for the bridge: scripts wait here until finish() is called."""

    def __init__(self):
        self.running: list[tuple[str, object]] = []
        self.ran: list[str] = []
    def run(self, script, reply):
        self.running.append((script, reply))
    def finish(self, queue, ok=True, error=""):
        script, reply = self.running.pop(0)
        self.ran.append(script)
        reply(ok, error)
        queue.done()         # the session thread, told by `finished`


def make(limit=32):
    reactor = FakeReactor()
    queue = GcodeQueue(reactor.run, lambda: None, limit=limit)
    return reactor, queue


def test_one_script_in_flight_and_the_latest_per_key_wins():
    reactor, queue = make()
    replies = []
    for target in range(300):
        queue.submit("heater:bed", "BED %d" % (target,),
                     lambda ok, err, t=target: replies.append((t, ok)))
        queue.submit("heater:tool0", "TOOL %d" % (target,),
                     lambda ok, err: None)
    assert len(reactor.running) == 1
    while reactor.running:
        reactor.finish(queue)
    assert reactor.ran == ["BED 0", "TOOL 299", "BED 299"]
    assert replies == [(0, True), (299, True)]


def test_full_queue_refuses_new_keys_with_a_reply():
    reactor, queue = make(limit=2)
    replies = []
    for i in range(5):
        queue.submit("raw:%d" % (i,), "M117 %d" % (i,),
                     lambda ok, err: replies.append((ok, err)))
    assert queue.dropped == 2
    assert replies == [(False, OVERFLOW_ERROR)] * 2
    # A waiting key is still replaced when full
    assert queue.submit("raw:2", "M117 new", lambda ok, err: None)
    while reactor.running:
        reactor.finish(queue)
    assert reactor.ran == ["M117 0", "M117 1", "M117 new"]


def test_waiting_and_running_scripts_can_be_read_and_withdrawn():
    reactor, queue = make()
    queue.submit("pause-resume", "PAUSE", lambda ok, err: None)
    queue.submit("pause-resume", "RESUME", lambda ok, err: None)
    assert queue.running_script("pause-resume") == "PAUSE"
    assert queue.waiting_script("pause-resume") == "RESUME"
    assert queue.withdraw("pause-resume")
    assert not queue.withdraw("pause-resume")
    reactor.finish(queue)
    assert queue.running_script("pause-resume") == ""
    assert reactor.running == []


def test_a_failed_reply_still_frees_the_slot():
    reactor, queue = make()

    def broken(ok, err):
        raise RuntimeError("bug in a reply")
    finished = []
    queue = GcodeQueue(reactor.run, lambda: finished.append(1))
    queue.submit("a", "A", broken)
    script, reply = reactor.running.pop()
    try:
        reply(True, "")
    except RuntimeError:
        pass
    assert finished == [1]
