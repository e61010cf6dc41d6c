# The helper host: one small process per klippy that starts every Python
# helper child (fetcher.py, imaging.py, keyhelper.py) by fork
#
# A helper started as a new interpreter spent about 11 ms of CPU before
# its first line could pace anything; under a CPU quota shared with klippy
# that made klippy's reactor up to 10 ms late at each snapshot and
# download.  The host pays that start once, when the session starts, then
# loads (paced) the small modules every helper imports and compiles their
# scripts; a helper is then a fork that runs its script from the first
# instruction, paced by the script itself.
#
# children.HelperHost starts it as `python -I helperhost.py FD SCRIPT...`,
# FD one end of a SOCK_SEQPACKET socket pair.  Each message on it is a
# task: a JSON header {"script" (its path), "args", "cwd", "env" (what
# changed in klippy's environment since the host started)} with four
# descriptors (the child's stdin, stdout and stderr, and the task's own
# socket).  On the task socket the host says "pid N" once the child runs
# and "exit C" once it reaped it (C as subprocess gives it); klippy's end
# shutting the task socket down kills the child.  When klippy's end of FD
# closes (klippy ended), the host kills its children and leaves.  It
# imports nothing from its package; it runs at idle priority like its
# children.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import array
import gc
import importlib
import importlib.util
import json
import os
import selectors
import signal
import socket
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_HEADER = 65536
MAX_FDS = 4
# Small and used by every helper (about 5 MB in all with the interpreter,
# and 2.5 MB for ssl and the CA bundle's TLS context, see Trust);
# http.client, Pillow and cryptography would be 10 MB more, resident for
# klippy's lifetime: each helper imports those itself, paced
PRELOAD = ("base64", "ctypes", "io", "json", "math", "selectors", "socket",
           "struct", "types", "warnings", "zlib",
           # OpenSSL's libraries and their start: one call into C each (6
           # and 3 ms of CPU) that no pacer could cut, paid once here
           "_hashlib", "_ssl", "ssl")
PR_SET_PDEATHSIG, PR_SET_NAME = 1, 15
# netpolicy.tls_context takes the trusted CAs from here
TRUST_MODULE = "polar_cloud_trust"
PEM_END = "-----END CERTIFICATE-----"


def load_pacing():
    spec = importlib.util.spec_from_file_location(
        "polar_cloud_pacing", os.path.join(HERE, "pacing.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_libc = []     # opened once, by the host: 0.3 ms a time


def prctl(option: int, value) -> None:
    try:
        if not _libc:
            import ctypes
            _libc.append(ctypes.CDLL(None, use_errno=True).prctl)
        _libc[0](option, value)
    except (OSError, AttributeError, ImportError):
        pass


def close_inherited() -> None:
    """Close what the child inherited but stdin, stdout and stderr (by
    /proc: a loop up to the descriptor limit can be a million calls)."""
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd > 2:
            try:
                os.close(fd)
            except OSError:
                pass


def run_child(host: int, path: str, code, header: dict,
              fds: list[int]) -> None:
    """In the forked child: become the helper, run its script as
    __main__, and leave without the interpreter's teardown."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
    close_inherited()
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != host:
        os._exit(1)
    name = "polar_" + os.path.basename(path)[:-3]
    prctl(PR_SET_NAME, name[:15].encode())
    for key, value in (header.get("env") or {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if header.get("cwd"):
        os.chdir(header["cwd"])
    sys.argv = [path] + [str(a) for a in header.get("args", [])]
    exit_code = 0
    try:
        exec(code, {"__name__": "__main__", "__file__": path,
                    "__builtins__": __builtins__, "__package__": None,
                    "__spec__": None, "__doc__": None})
    except SystemExit as e:
        exit_code = e.code if isinstance(e.code, int) else (
            0 if e.code is None else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
        exit_code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(exit_code)


def say(sock: socket.socket, text: str) -> None:
    try:
        sock.send(text.encode() + b"\n")
    except OSError:
        pass


def certifi_bundle() -> str:
    """certifi's cacert.pem (requests' CA bundle), found without importing
    certifi: that is importlib.resources, 13 ms and 1 MB more."""
    spec = importlib.util.find_spec("certifi")
    for folder in (spec and spec.submodule_search_locations) or ():
        path = os.path.join(folder, "cacert.pem")
        if os.path.isfile(path):
            return path
    raise ImportError("certifi's cacert.pem not found")


class Trust:
    """certifi's CA bundle in a TLS context, loaded here a certificate at
    a time, for every helper that speaks TLS: loading it in each was
    about 20 ms of CPU, in calls into C of 1 to 2 ms that no pacer can
    cut.  Forked helpers find it in sys.modules[TRUST_MODULE] (context
    and bundle, the file it was loaded from) once it is complete."""

    def __init__(self):
        self.module = types.ModuleType(TRUST_MODULE)
        self.module.context, self.module.bundle = None, ""
        sys.modules[TRUST_MODULE] = self.module
        self.context = None
        self.pending: list[str] = []
    def step(self) -> bool:
        """One certificate's work; False once there is nothing left."""
        if self.context is None:
            try:
                import ssl
                bundle = certifi_bundle()
                with open(bundle, encoding="ascii", errors="replace") as f:
                    pem = f.read()
            except (ImportError, OSError):
                return False    # each helper loads what it finds itself
            self.module.bundle = bundle
            self.pending = [c + PEM_END for c in pem.split(PEM_END)
                            if "-----BEGIN CERTIFICATE-----" in c]
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            return True
        if self.pending:
            try:
                self.context.load_verify_locations(cadata=self.pending.pop())
            except ValueError:
                pass    # not a certificate after all (SSLError is one)
            return True
        self.module.context = self.context
        return False


class Host:
    def __init__(self, control: socket.socket, scripts: list[str],
                 pacing, pacer):
        self.control = control
        self.host_pid = os.getpid()
        self.pacing = pacing
        self.pacer = pacer
        self.paced_imports = pacing.pace_imports(pacer)
        self.codes: dict[tuple, object] = {}
        # What the helpers import, loaded here, and their scripts
        # compiled, a step at a time while the host has nothing else to
        # do (a helper wanted first does not wait): a fork starts with both
        self.warm_up: list = list(PRELOAD) + scripts + [Trust().step]
        self.selector = selectors.DefaultSelector()
        self.running: dict[int, socket.socket] = {}
        self.wakeup_r, wakeup_w = os.pipe()
        os.set_blocking(self.wakeup_r, False)
        os.set_blocking(wakeup_w, False)
        signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
        signal.set_wakeup_fd(wakeup_w, warn_on_full_buffer=False)
        self.selector.register(control, selectors.EVENT_READ, self.take)
        self.selector.register(self.wakeup_r, selectors.EVENT_READ,
                               self.reap)
    def serve(self) -> None:
        while True:
            events = self.selector.select(0 if self.warm_up else None)
            for key, _events in events:
                key.data(key.fileobj)
            if not events and self.warm_up:
                self.pacer()
                if not self.warm(self.warm_up[0]):
                    self.warm_up.pop(0)
                # What is loaded stays out of the collector's sight: a
                # child's first full collection would otherwise touch
                # (and copy) every page of it at once, in one unpaced call
                gc.freeze()
    def warm(self, step) -> bool:
        """One step of the warm-up: a module, a script or a function; True
        if that step wants another turn."""
        if callable(step):
            return step()
        if os.path.isabs(step):
            self.code(step)
            return False
        try:
            importlib.import_module(step)
        except Exception:   # the helper that needs it says so itself
            pass
        return False
    def code(self, path: str):
        """A script compiled once (klippy's helpers are compiled while
        idle; a test's scripts when asked for)."""
        st = os.stat(path)
        key = (path, st.st_mtime_ns, st.st_size)
        if key not in self.codes:
            with open(path, "rb") as f:
                self.codes[key] = compile(f.read(), path, "exec")
        return self.codes[key]
    def take(self, _control) -> None:
        fds = array.array("i")
        msg, ancdata, _flags, _addr = self.control.recvmsg(
            MAX_HEADER, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        if not msg:
            self.leave()
        fds = list(fds)
        try:
            self.start(msg, fds)
        finally:
            for fd in fds[:3]:
                os.close(fd)
    def start(self, msg: bytes, fds: list[int]) -> None:
        if len(fds) != MAX_FDS:
            for fd in fds[3:]:
                os.close(fd)
            return
        task = socket.socket(fileno=fds[3])
        try:
            header = json.loads(msg)
            path = header["script"]
            code = self.code(path)
        except (ValueError, KeyError, TypeError, OSError, SyntaxError):
            say(task, "error no such helper")
            task.close()
            return
        pid = os.fork()
        if pid == 0:
            try:
                # A child paces itself: the host's pacer, called at the
                # child's imports, would count all the child's CPU since
                # its last call (a download's: a pause of minutes)
                if self.paced_imports in sys.meta_path:
                    sys.meta_path.remove(self.paced_imports)
                # Paced on ticks until its script paces itself: its first
                # milliseconds are copies of the pages it writes to,
                # unpaced they spent a 30 % quota's period at once
                self.pacing.tick(self.pacer.renewed())
                run_child(self.host_pid, path, code, header, fds)
            finally:
                os._exit(70)
        self.running[pid] = task
        self.selector.register(task, selectors.EVENT_READ, self.kill)
        say(task, "pid %d" % (pid,))
    def kill(self, task: socket.socket) -> None:
        """klippy's end of the task socket shut down (or sent anything):
        the child goes now; its exit is still said once reaped."""
        self.selector.unregister(task)
        for pid, sock in self.running.items():
            if sock is task:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
    def reap(self, _fd) -> None:
        try:
            while os.read(self.wakeup_r, 512):
                pass
        except BlockingIOError:
            pass
        while self.running:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            task = self.running.pop(pid, None)
            if task is None:
                continue
            say(task, "exit %d" % (os.waitstatus_to_exitcode(status),))
            try:
                self.selector.unregister(task)
            except (KeyError, ValueError):
                pass
            task.close()
    def leave(self) -> None:
        for pid in self.running:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        os._exit(0)


def main() -> None:
    # Its folder off sys.path: the package's modules must not shadow the
    # standard library's in the helpers
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
    control = socket.socket(fileno=int(sys.argv[1]))
    pacing = load_pacing()
    pacing.lower_priority()
    prctl(PR_SET_NAME, b"polar_helpers")
    pacer = pacing.CpuPacer.for_this_process()
    host = Host(control, sys.argv[2:], pacing, pacer)
    gc.freeze()
    say(control, "ready")
    host.serve()


if __name__ == "__main__":
    main()
