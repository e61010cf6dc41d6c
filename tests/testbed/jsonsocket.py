"""A websocket client speaking JSON with numbered requests, as the test
bed's Chromium (DevTools) and Moonraker clients use it.

    class Client(JsonSocket):
        def on_message(self, msg): ...      # what is not an answer
    answer = client.request({"method": "x", "params": {}}, timeout=30)

A reader thread hands each answer to the request waiting for its id and
everything else to on_message(), both under no lock; `cond` guards what
subclasses keep and is notified when the socket closes.
"""

from __future__ import annotations

import itertools
import json
import queue
import threading
from typing import Optional

import websocket


class JsonSocket:
    def __init__(self, url: str, timeout: float, suppress_origin: bool,
                 name: str) -> None:
        self._ws = websocket.create_connection(
            url, timeout=timeout, suppress_origin=suppress_origin)
        self._ws.settimeout(None)
        self._ids = itertools.count(1)
        self._waiters: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self.closed = False
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                        name=name)

    def start_reading(self) -> None:
        """Start the reader (once the subclass is ready for messages)."""
        self._reader.start()

    def on_message(self, msg: dict) -> None:
        """A message that answers no request (an event, a notification)."""

    def request(self, payload: dict, timeout: float) -> Optional[dict]:
        """Send payload with a new "id"; the answer, or None when the
        socket closed first.  TimeoutError when none came in time."""
        req_id = next(self._ids)
        answer: queue.Queue = queue.Queue()
        with self._lock:
            self._waiters[req_id] = answer
        self._ws.send(json.dumps(dict(payload, id=req_id)))
        try:
            return answer.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("no answer within %.0fs" % (timeout,)) \
                from None
        finally:
            with self._lock:
                self._waiters.pop(req_id, None)

    def close(self) -> None:
        try:
            self._ws.send_close()
        except (websocket.WebSocketException, OSError):
            pass
        try:
            self._ws.abort()        # wakes the reader blocked in recv()
        except (websocket.WebSocketException, OSError):
            pass
        self._reader.join(5)
        self._ws.shutdown()

    def _read_loop(self) -> None:
        try:
            while True:
                raw = self._ws.recv()
                if not raw:
                    break
                msg = json.loads(raw)
                if "id" in msg:
                    with self._lock:
                        waiter = self._waiters.pop(msg["id"], None)
                    if waiter is not None:
                        waiter.put(msg)
                else:
                    self.on_message(msg)
        except (websocket.WebSocketException, OSError, ValueError):
            pass
        finally:
            with self._cond:
                self.closed = True
                self._cond.notify_all()
                for waiter in self._waiters.values():
                    waiter.put(None)
