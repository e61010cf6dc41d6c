"""One session per state folder across RESTART (takeover.py): the new
session waits for the old one's last writes; one still busy afterwards is
abandoned and never writes again."""
from __future__ import annotations

import threading
from types import SimpleNamespace

from klippy_extras.polar_cloud import takeover


def session(path, thread=None):
    return SimpleNamespace(options=SimpleNamespace(state_path=str(path)),
                           thread=thread, abandoned=False)


def test_the_old_session_finishes_first(tmp_path):
    release = threading.Event()
    writes = []

    def last_writes():
        release.wait()
        writes.append("old")
    old = session(tmp_path, threading.Thread(target=last_writes))
    takeover.take_over(old)
    old.thread.start()
    release.set()
    new = session(tmp_path)
    takeover.take_over(new)
    writes.append("new")
    assert writes == ["old", "new"] and not old.abandoned


def test_a_busy_old_session_is_abandoned(tmp_path, monkeypatch):
    monkeypatch.setattr(takeover, "TAKEOVER_WAIT", .01)
    stuck = threading.Event()
    old = session(tmp_path, threading.Thread(target=stuck.wait, daemon=True))
    takeover.take_over(old)
    old.thread.start()
    takeover.take_over(session(tmp_path))
    assert old.abandoned
    stuck.set()


def test_each_state_folder_has_its_own_owner(tmp_path):
    stuck = threading.Event()
    other = session(tmp_path / "a", threading.Thread(target=stuck.wait,
                                                     daemon=True))
    takeover.take_over(other)
    other.thread.start()
    takeover.take_over(session(tmp_path / "b"))
    assert not other.abandoned
    stuck.set()
