"""What the test bed's servers share: starting and stopping, waiting until
they are ready, the asyncio loop some of them run in a thread, and the
threads of the threaded ones.

    class Thing(BackgroundServer):      # start() -> self, stop()
        ...
    with Thing(...) as thing:           # started, stopped however it ends
        ...
    wait_ready(check, 20, "nginx", process_gone(proc, log_path))
    wait_until(cond, check, 30, "an upload")    # on a Condition
    loop = LoopThread("polarsim"); loop.start(startup); loop.call(coro)
    class Cam(HttpServer): handler_class = ...  # http.server in a thread
    class Srv(TcpServer): def handle(self, conn): ...   # a thread each
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Awaitable, Coroutine
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

POLL_INTERVAL = 0.05

_S = TypeVar("_S", bound="BackgroundServer")


class BackgroundServer:
    """A test bed server usable as `with Server(...) as s:`: start()
    returns the started server, stop() may be called more than once."""

    def start(self: _S) -> _S:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self: _S) -> _S:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_ready(check: Callable[[], Any], timeout: float, what: str,
               exited: Callable[[], Optional[str]] = lambda: None) -> Any:
    """Poll check() until it returns something truthy, and return that (a
    server coming up has no event to wait on).  exited() says why the
    server's process is gone (None while it runs): RuntimeError at once.
    TimeoutError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        gone = exited()
        if gone is not None:
            raise RuntimeError("%s exited: %s" % (what, gone))
        if time.monotonic() >= deadline:
            raise TimeoutError("%s not ready within %.0fs" % (what, timeout))
        time.sleep(POLL_INTERVAL)


def process_gone(proc, log_path=None) -> Callable[[], Optional[str]]:
    """For wait_ready's exited: why proc is gone (its exit code and the
    end of its log), None while it runs."""
    def gone() -> Optional[str]:
        if proc is None or proc.poll() is None:
            return None
        text = ""
        if log_path is not None:
            try:
                text = ":\n" + Path(log_path).read_text(
                    errors="replace")[-2000:]
            except OSError:
                pass
        return "code %s%s" % (proc.returncode, text)
    return gone


def port_open(host: str, port: int) -> bool:
    """Something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), 1):
            return True
    except OSError:
        return False


def wait_until(cond: threading.Condition, check: Callable[[], Any],
               timeout: float, what: str) -> Any:
    """Block until check() returns something truthy; return it.  check runs
    under cond's lock, at once and each time cond is notified.  Raises
    TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    with cond:
        while True:
            result = check()
            if result:
                return result
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out after %gs waiting for %s"
                                   % (timeout, what))
            cond.wait(left)


class LoopThread:
    """An asyncio event loop of its own in a daemon thread.

    start(startup) runs startup() on it and returns once it is done (its
    exception is raised in the caller); call(coro) runs a coroutine there
    from any other thread; stop(shutdown) runs shutdown() there, then ends
    the loop, its tasks and the thread."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def start(self, startup: Callable[[], Awaitable[Any]],
              timeout: float = 30.) -> None:
        if self.thread is not None:
            raise RuntimeError("%s already started" % (self.name,))
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run,
                                       args=(startup, ready),
                                       name=self.name, daemon=True)
        self.thread.start()
        if not ready.wait(timeout):
            raise RuntimeError("%s did not start within %.0f s"
                               % (self.name, timeout))
        if self._error is not None:
            self.thread.join(5)
            self.thread = None
            raise RuntimeError("%s failed to start" % (self.name,)) \
                from self._error

    def running(self) -> bool:
        return self.loop is not None and self.loop.is_running()

    def in_loop(self) -> bool:
        return threading.current_thread() is self.thread

    def call(self, coro: Coroutine[Any, Any, Any],
             timeout: float = 10.) -> Any:
        """Run a coroutine on the loop from another thread; its result."""
        if not self.running():
            coro.close()
            raise RuntimeError("%s is not running" % (self.name,))
        if self.in_loop():
            coro.close()
            raise RuntimeError("%s: a blocking call from its own loop"
                               % (self.name,))
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(
            timeout)

    def stop(self, shutdown: Optional[Callable[[], Awaitable[Any]]] = None,
             timeout: float = 10.) -> None:
        thread, loop = self.thread, self.loop
        if thread is None or loop is None:
            return
        if loop.is_running():
            if shutdown is not None:
                fut = asyncio.run_coroutine_threadsafe(shutdown(), loop)
                try:
                    fut.result(timeout)
                except Exception:
                    pass
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self.thread = None

    def _run(self, startup: Callable[[], Awaitable[Any]],
             ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(startup())
        except BaseException as e:  # raised by start()
            self._error = e
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending,
                                                   return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()


class QuietHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: Any = None       # the HttpServer, for its handlers

    def handle_error(self, request, client_address) -> None:
        pass        # test clients hang up on purpose


class HttpServer(BackgroundServer):
    """An http.server on loopback in a daemon thread; the handler class
    finds this object as self.server.owner.  stop() sets `stopping`, which
    handlers may wait on."""

    handler_class: type[BaseHTTPRequestHandler]
    thread_name = "http-server"

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.stopping = threading.Event()
        self._httpd: Optional[QuietHTTPServer] = None

    @property
    def url(self) -> str:
        return "http://%s:%d" % (self.host, self.port)

    def start(self: _S) -> _S:
        assert isinstance(self, HttpServer)
        httpd = QuietHTTPServer((self.host, self.port), self.handler_class)
        httpd.owner = self
        self.port = httpd.server_address[1]
        self._httpd = httpd
        threading.Thread(target=httpd.serve_forever, name=self.thread_name,
                         daemon=True).start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()


class TcpServer(BackgroundServer):
    """A listening socket on loopback whose connections are each handled
    by handle(conn) in a daemon thread of their own (threaded and blocking
    on purpose: a test server sees every byte and every failed handshake).
    stop() sets `stopping`, which handlers may wait on."""

    backlog = 16
    thread_name = "tcpserver"

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.stopping = threading.Event()
        self._listener: Optional[socket.socket] = None

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def accepted(self) -> None:
        """Called on the accept thread for each new connection."""

    def start(self: _S) -> _S:
        assert isinstance(self, TcpServer)
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((self.host, self.port))
        lsock.listen(self.backlog)
        lsock.settimeout(0.2)
        self._listener = lsock
        self.port = lsock.getsockname()[1]
        threading.Thread(target=self._accept_loop, name=self.thread_name,
                         daemon=True).start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self._listener is not None:
            self._listener.close()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self.stopping.is_set():
            try:
                conn, _addr = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.accepted()
            threading.Thread(target=self.handle, args=(conn,),
                             name=self.thread_name + "-conn",
                             daemon=True).start()
