"""A fault-injecting TCP proxy on loopback (a small Toxiproxy for the tests).

    proxy = FaultProxy(("127.0.0.1", sim.port)).start()
    url = proxy.url                     # point server_url here
    proxy.set(latency=0.5)              # seconds added to every chunk
    proxy.set(bandwidth=10_000)         # bytes/s per direction
    proxy.set(stall=True)               # stop forwarding, keep TCP open
    proxy.set(refuse="reset")           # new connections: RST at once
    proxy.set(reset_after=4096)         # RST each link after N bytes down
    proxy.reset_all(); proxy.close_all()
    proxy.clear()                       # back to a clean pipe
    proxy.stop()

Every setting applies at once to live links too.  The proxy runs its own
asyncio loop in a daemon thread; all public methods are synchronous and
thread-safe.  It records each accepted connection (monotonic time) and the
bytes carried each way, so tests can assert on what went through.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from tests.testbed.servers import BackgroundServer, LoopThread, wait_until

CHUNK = 16 * 1024


@dataclass
class Faults:
    latency: float = 0.          # seconds added to every chunk, each way
    bandwidth: Optional[int] = None   # bytes/s per direction and link
    stall: bool = False          # forward nothing (links stay open)
    refuse: Optional[str] = None  # None, "reset" or "close" new links
    reset_after: Optional[int] = None  # RST a link after N bytes downstream


@dataclass
class Link:
    t: float
    up: int = 0                  # client -> server bytes
    down: int = 0                # server -> client bytes
    closed: bool = False
    client_eof: bool = False     # the printer closed (or reset) its side
    how: str = ""
    writers: list = field(default_factory=list)


def _rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                            struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class FaultProxy(BackgroundServer):
    def __init__(self, target: tuple[str, int], host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.target = target
        self.host = host
        self._want_port = port
        self.port: Optional[int] = None
        self.faults = Faults()
        self.links: list[Link] = []
        self.refused = 0
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._changed: Optional[asyncio.Event] = None
        self._loop_thread = LoopThread("faultproxy")
        self._server: Optional[asyncio.AbstractServer] = None

    # -- life cycle
    @property
    def url(self) -> str:
        return "http://%s:%d" % (self.host, self.port)

    def start(self) -> FaultProxy:
        self._loop_thread.start(self._startup, timeout=10)
        return self

    def stop(self) -> None:
        self._loop_thread.stop(self._shutdown)

    async def _startup(self) -> None:
        self._changed = asyncio.Event()
        self._server = await asyncio.start_server(
            self._accept, self.host, self._want_port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        self._kill_all(reset=False)

    # -- control (any thread)
    def set(self, **changes: Any) -> None:
        def apply() -> None:
            for name, value in changes.items():
                if not hasattr(self.faults, name):
                    raise KeyError(name)
                setattr(self.faults, name, value)
            self._wake()
        self._call(apply)

    def clear(self) -> None:
        def apply() -> None:
            self.faults = Faults()
            self._wake()
        self._call(apply)

    def reset_all(self) -> int:
        """RST every live link (like a crashed peer or a NAT timeout)."""
        return self._call(lambda: self._kill_all(reset=True))

    def close_all(self) -> int:
        return self._call(lambda: self._kill_all(reset=False))

    def live(self) -> int:
        with self._lock:
            return sum(1 for link in self.links if not link.closed)

    def links_since(self, since: float) -> list[Link]:
        with self._lock:
            return [link for link in self.links if link.t >= since]

    def wait_until(self, check, timeout: float = 30.) -> Any:
        """Block until check() (run under the proxy's lock on every change)
        is truthy; return it."""
        return wait_until(self._cond, check, timeout, "faultproxy: condition")

    def connections(self, since: Optional[float] = None) -> list[float]:
        with self._lock:
            return [link.t for link in self.links
                    if since is None or link.t >= since]

    def _call(self, fn: Any) -> Any:
        async def run() -> Any:
            return fn()
        return self._loop_thread.call(run())

    def _wake(self) -> None:
        assert self._changed is not None
        self._changed.set()
        self._changed = asyncio.Event()

    def _kill_all(self, reset: bool) -> int:
        n = 0
        with self._lock:
            links = [link for link in self.links if not link.closed]
        for link in links:
            self._kill(link, reset, "reset" if reset else "closed")
            n += 1
        return n

    def _kill(self, link: Link, reset: bool, how: str) -> None:
        with self._cond:
            if link.closed:
                return
            link.closed, link.how = True, how
            self._cond.notify_all()
        for writer in link.writers:
            if reset:
                _rst(writer)
            else:
                writer.close()
        self._wake()

    # -- the pipe
    async def _accept(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        refuse = self.faults.refuse
        if refuse is not None:
            with self._lock:
                self.refused += 1
            if refuse == "reset":
                _rst(writer)
            else:
                writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _rst(writer)
            return
        link = Link(time.monotonic(), writers=[writer, up_writer])
        with self._cond:
            self.links.append(link)
            self._cond.notify_all()
        await asyncio.gather(
            self._pump(link, reader, up_writer, "up"),
            self._pump(link, up_reader, writer, "down"),
            return_exceptions=True)
        self._kill(link, False, link.how or "closed")

    async def _pump(self, link: Link, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, direction: str) -> None:
        """Read chunks, hold each for `latency`, pace to `bandwidth`."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=64)

        def eof() -> None:
            if direction == "up":
                with self._cond:
                    link.client_eof = True
                    self._cond.notify_all()

        async def read() -> None:
            try:
                while not link.closed:
                    # A stalled link still notices the printer hanging up
                    data = await reader.read(CHUNK)
                    if not data:
                        eof()
                    await queue.put((time.monotonic(), data))
                    if not data:
                        return
            except (OSError, asyncio.IncompleteReadError):
                eof()
                await queue.put((time.monotonic(), b""))

        reading = asyncio.ensure_future(read())
        try:
            while not link.closed:
                t, data = await queue.get()
                if not data:
                    break
                await self._while_stalled(link)
                delay = t + self.faults.latency - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                view = memoryview(data)
                while view and not link.closed:
                    await self._while_stalled(link)
                    rate = self.faults.bandwidth
                    piece = view if not rate else view[:max(1, rate // 10)]
                    if direction == "down" and self.faults.reset_after \
                            is not None and link.down + len(piece) \
                            > self.faults.reset_after:
                        self._kill(link, True, "reset_after")
                        return
                    writer.write(bytes(piece))
                    await writer.drain()
                    with self._lock:
                        if direction == "up":
                            link.up += len(piece)
                        else:
                            link.down += len(piece)
                    view = view[len(piece):]
                    if rate:
                        await asyncio.sleep(len(piece) / rate)
            if not link.closed:
                try:
                    writer.write_eof()
                except OSError:
                    pass
        except (OSError, ConnectionError):
            pass
        finally:
            reading.cancel()

    async def _while_stalled(self, link: Link) -> None:
        while self.faults.stall and not link.closed:
            assert self._changed is not None
            await self._changed.wait()
