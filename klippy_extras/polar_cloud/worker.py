# A worker thread that runs queued calls one after the other
#
# The thread exists only while there is work (a print without a
# timelapse costs no thread).  Results go to a callback, which hands them
# to the session thread through its inbox.  Used for timelapse frames,
# renders and uploads, and the Moonraker webcam lookup.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import collections
import functools
import logging
import threading
import time
from typing import Callable, Optional

log = logging.getLogger("polar_cloud")


def contained(fallback=None):
    """For the session's calls into an optional feature (timelapse,
    webcam lookup): a bug there is logged once and goes no further, so
    the session, its connection and the job go on.  fallback(*args) (or
    fallback itself) is returned instead."""
    def wrap(method):
        logged = []
        @functools.wraps(method)
        def wrapper(self, *args):
            try:
                return method(self, *args)
            except Exception:
                if not logged:
                    logged.append(True)
                    log.exception("polar_cloud: %s failed",
                                  method.__qualname__)
                return fallback(*args) if callable(fallback) else fallback
        return wrapper
    return wrap


class Worker:
    def __init__(self, name: str, stop: threading.Event):
        self.name = name
        self.stop_event = stop
        self.lock = threading.Lock()
        self.tasks: collections.deque = collections.deque()
        self.thread: Optional[threading.Thread] = None
        self.running = False
        self.failed_at = 0.         # the last bug logged (one per 10 min)
    def submit(self, fn: Callable, *args,
               done: Optional[Callable] = None) -> bool:
        """Run fn(*args) after what is queued; done(result) afterwards
        (result None when fn raised, which is logged)."""
        with self.lock:
            if self.stop_event.is_set():
                return False
            self.tasks.append((fn, args, done))
            if self.thread is not None:
                return True
            thread = threading.Thread(target=self._run, name=self.name,
                                      daemon=True)
            self.thread = thread
        try:
            thread.start()
        except RuntimeError as e:       # out of threads
            with self.lock:
                self.tasks.clear()
                self.thread = None
            log.warning("polar_cloud: cannot start %s: %s", self.name, e)
            return False
        return True
    def busy(self) -> bool:
        with self.lock:
            return bool(self.tasks) or self.running
    def join(self, timeout: float) -> None:
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
    def _run(self) -> None:
        while True:
            with self.lock:
                if not self.tasks or self.stop_event.is_set():
                    self.tasks.clear()
                    self.thread = None
                    self.running = False
                    return
                fn, args, done = self.tasks.popleft()
                self.running = True
            result = None
            try:
                result = fn(*args)
            except Exception:
                now = time.monotonic()
                if not self.failed_at or now - self.failed_at > 600.:
                    self.failed_at = now
                    log.exception("polar_cloud: %s failed", self.name)
            if done is not None:
                try:
                    done(result)
                except Exception:
                    log.exception("polar_cloud: %s result handler failed",
                                  self.name)
