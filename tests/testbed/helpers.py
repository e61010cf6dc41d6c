"""What the tests that run a real klippy share (fixtures live in
tests/conftest.py, everything else here): the printer's config section,
registration and provisioning, waits on printer.polar_cloud and on the
cloud's records, process resources, klippy.log accounting.

    serial = register(k, sim)              # POLAR_REGISTER, then online
    serial = provision(k.state_path, sim)  # identity without POLAR_REGISTER
    wait_polar(k, lambda st: st["state"] == "online")
    hist = StateHistory.attach(k)          # every polar_cloud update
    hist.wait_for(lambda st: st["state"] == "online")
    hist.backoffs(since=i)                 # [(retries, retry_in), ...]
    base = proc_stats(k.pid)               # threads, fds, RSS
    settle(k.pid, base)                    # poll /proc until back (deadline)
    poll_until(lambda: ..., timeout)       # poll /proc for anything
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from tests.testbed.gcode_files import demo_print
from tests.testbed.klippy import REPO, Klippy, KlippyTimeout, ObjectSubscription

EXTRA = REPO / "klippy_extras" / "polar_cloud"
EMAIL = "maker@school.example.org"
PIN = "Zq7x91"          # distinctive, so a leak is findable by grep
SETTLE_POLL = 0.2

# Lines the polar_cloud extra writes to klippy.log: its own logger, its
# console messages, and the libraries it drives (not klippy's API debug
# lines that merely mention the object name)
POLAR_LINE_RE = re.compile(r"^(polar_cloud|Polar Cloud|!! Polar Cloud)"
                           r"|socketio|engineio|websocket")


@dataclass(frozen=True)
class ProcStats:
    threads: int
    fds: int
    rss_kb: int

    def __str__(self) -> str:
        return "threads=%d fds=%d rss=%d kB" % (self.threads, self.fds,
                                                self.rss_kb)


def proc_stats(pid: int) -> ProcStats:
    threads = len(os.listdir("/proc/%d/task" % (pid,)))
    fds = len(os.listdir("/proc/%d/fd" % (pid,)))
    rss = 0
    with open("/proc/%d/status" % (pid,)) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return ProcStats(threads, fds, rss)


def fd_kinds(pid: int) -> dict[str, int]:
    """Open file descriptors by kind: socket, pipe, file, other."""
    kinds: dict[str, int] = {}
    for target in fd_targets(pid):
        kind = ("socket" if target.startswith("socket:") else "pipe"
                if target.startswith("pipe:") else "file"
                if target.startswith("/") else "other")
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def thread_names(pid: int) -> list[str]:
    names = []
    for tid in os.listdir("/proc/%d/task" % (pid,)):
        try:
            with open("/proc/%d/task/%s/comm" % (pid, tid)) as f:
                names.append(f.read().strip())
        except OSError:
            pass
    return sorted(names)


def settle(pid: int, baseline: ProcStats, tolerance: int = 2,
           timeout: float = 30., fds: bool = True) -> ProcStats:
    """Poll /proc until threads (and fds, unless fds=False) are within
    `tolerance` of the baseline (there is no event for "a thread ended");
    return the last reading, which the caller asserts on."""
    deadline = time.monotonic() + timeout
    while True:
        now = proc_stats(pid)
        if abs(now.threads - baseline.threads) <= tolerance \
                and (not fds or abs(now.fds - baseline.fds) <= tolerance):
            return now
        if time.monotonic() >= deadline:
            return now
        time.sleep(SETTLE_POLL)


def poll_until(check: Callable[[], object], timeout: float = 30.,
               what: str = "condition") -> object:
    """Poll check() (something in /proc: there is no event for it) until
    it returns something truthy, and return that; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError("%s: not reached within %.0fs"
                                 % (what, timeout))
        time.sleep(SETTLE_POLL)


def fd_targets(pid: int) -> list[str]:
    """What the process's file descriptors point to (socket:[...], paths);
    none once the process is gone (a child may exit while we look)."""
    targets = []
    try:
        fds = os.listdir("/proc/%d/fd" % (pid,))
    except (FileNotFoundError, ProcessLookupError):
        return targets
    for fd in fds:
        try:
            targets.append(os.readlink("/proc/%d/fd/%s" % (pid, fd)))
        except OSError:
            continue
    return targets


@dataclass(frozen=True)
class Proc:
    ppid: int
    comm: str           # /proc/PID/comm: a forked helper's polar_<script>
    args: list[str]     # the command line


def process_table() -> dict[int, Proc]:
    """Every process readable in /proc, by pid (one that ends while we
    look is left out)."""
    procs: dict[int, Proc] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % (entry,)) as f:
                stat = f.read()
            with open("/proc/%s/cmdline" % (entry,), "rb") as f:
                args = f.read().decode("utf-8", "replace").split("\0")
            ppid = int(stat.rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        procs[int(entry)] = Proc(ppid, stat[stat.find("(") + 1:
                                            stat.rfind(")")], args)
    return procs


def runs(proc: Proc, script: str) -> bool:
    return any(script in arg for arg in proc.args)


def helper_hosts(pid: int, procs: dict[int, Proc]) -> set[int]:
    """The process's helper host (helperhost.py), a set of at most one."""
    return {p for p, proc in procs.items()
            if proc.ppid == pid and runs(proc, "helperhost.py")}


def children_running(pid: int, script: str) -> list[int]:
    """The pids of the process's helper children running script
    (fetcher.py, imaging.py, keyhelper.py: forked by its helper host,
    named polar_<script> there; or started by it directly, ffmpeg)."""
    procs = process_table()
    hosts = helper_hosts(pid, procs)
    forked = ("polar_" + script.removesuffix(".py"))[:15]
    return sorted(p for p, proc in procs.items()
                  if (proc.ppid == pid and p not in hosts
                      and runs(proc, script))
                  or (proc.ppid in hosts and proc.comm == forked))


class StateHistory(ObjectSubscription):
    """objects/subscribe on polar_cloud that keeps every update, in order."""

    def __init__(self, api_path: str) -> None:
        self.history: list[dict] = []
        super().__init__(api_path, {"polar_cloud": None})

    @classmethod
    def attach(cls, k: Klippy) -> StateHistory:
        sub = cls(str(k.api_path))
        k._subs.append(sub)          # closed with the klippy
        return sub

    def _on_subscribed(self, result) -> None:
        super()._on_subscribed(result)
        self.history.append(copy.deepcopy(self._status.get("polar_cloud",
                                                            {})))

    def _apply(self, msg: dict) -> None:
        super()._apply(msg)
        if "polar_cloud" in msg.get("params", {}).get("status", {}):
            self.history.append(copy.deepcopy(self._status["polar_cloud"]))

    def mark(self) -> int:
        with self._cond:
            return len(self.history)

    def since(self, index: int = 0) -> list[dict]:
        with self._cond:
            return copy.deepcopy(self.history[index:])

    def wait_for(self, predicate: Callable[[dict], bool],
                 timeout: float = 60., since: Optional[int] = None) -> dict:
        """Block until an update (from index `since`, default: the current
        state) satisfies predicate; return it."""
        return self.since(self.wait_index(predicate, timeout, since))[0]

    def wait_index(self, predicate: Callable[[dict], bool],
                   timeout: float = 60., since: Optional[int] = None) -> int:
        """Like wait_for, but return the index of the matching update (to
        wait for what comes after it)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            pos = len(self.history) - 1 if since is None else since
            pos = max(pos, 0)
            while True:
                for i in range(pos, len(self.history)):
                    try:
                        ok = predicate(self.history[i])
                    except (KeyError, TypeError):
                        ok = False
                    if ok:
                        return i
                pos = len(self.history)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise KlippyTimeout(
                        "polar_cloud never matched within %.0fs; last: %r"
                        % (timeout, self.history[-3:]))
                self._cond.wait(remaining)

    def states(self, since: int = 0) -> list[str]:
        """The sequence of states, repeats collapsed."""
        out: list[str] = []
        for st in self.since(since):
            if not out or out[-1] != st.get("state"):
                out.append(st.get("state"))
        return out

    def backoffs(self, since: int = 0) -> list[tuple[int, int]]:
        """One (retries, retry_in) per entry into backoff, in order."""
        out: list[tuple[int, int]] = []
        for st in self.since(since):
            if st.get("state") != "backoff":
                continue
            entry = (st.get("retries", 0), st.get("retry_in", 0))
            if not out or out[-1][0] != entry[0]:
                out.append(entry)
        return out


def check_schedule(entries: list[tuple[int, int]], base: float = 2.,
                   cap: float = 120.) -> list[str]:
    """Problems with a published backoff schedule: the n-th delay (retries
    n+1 after it was scheduled) must lie within +/-50 % of
    min(cap, base * 2**n) (retry_in is whole seconds, rounded down)."""
    problems = []
    for retries, retry_in in entries:
        n = retries - 1
        nominal = min(cap, base * 2 ** n)
        if not (int(0.5 * nominal) - 1 <= retry_in <= 1.5 * nominal):
            problems.append("retry %d: %d s is outside +/-50%% of %g s"
                            % (retries, retry_in, nominal))
    for (a, _), (b, _) in zip(entries, entries[1:]):
        if b != a + 1:
            problems.append("retries went %d -> %d" % (a, b))
    return problems


def send_marker(sim, serial: str, job_id: str) -> dict:
    """Push a job that fails at once (its file is a 404) and wait for its
    report: cloud events are handled in order, so once it is in, the
    printer has handled (and reported) everything pushed before it."""
    url = sim.add_file("%s.gcode" % (job_id,), b"", "404")
    since = sim.now()
    assert sim.push_print(serial, job_id, gcode_url=url) == 1, \
        "the printer is not online"
    return sim.wait_for("job", lambda d: d["jobId"] == job_id, since=since,
                        serial=serial, timeout=60)


def polar_lines(k: Klippy, start: int = 0) -> list[str]:
    """klippy.log lines from polar_cloud or its libraries, from byte
    offset `start`."""
    try:
        with open(k.log_path, "rb") as f:
            f.seek(start)
            text = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return []
    return [line for line in text.splitlines() if POLAR_LINE_RE.search(line)]


def log_size(k: Klippy) -> int:
    try:
        return os.path.getsize(k.log_path)
    except FileNotFoundError:
        return 0


def provision(state_path: Path, sim, mac: Optional[str] = None) -> str:
    """Give a printer an identity the simulator knows, without the
    registration round trip (the module's own IdentityStore writes it)."""
    from klippy_extras.polar_cloud.identity import IdentityStore
    from klippy_extras.polar_cloud.statefiles import ensure_state_dir
    state_path = Path(state_path)
    ensure_state_dir(str(state_path))
    if mac is None:
        node = uuid.uuid4().int & 0xffffffffff
        mac = "02:" + ":".join("%02X" % ((node >> s) & 0xff)
                               for s in range(32, -8, -8))
    (state_path / "identity.json").write_text(json.dumps({"mac": mac}))
    os.chmod(state_path / "identity.json", 0o600)
    store = IdentityStore(str(state_path), "kl")
    store.create_key()
    serial = sim.add_printer(store.public_pem(), mac=mac,
                             mfg_sn=store.machine()["mfg_sn"])
    store.save(serial, sim.url)
    return serial



def polar_cfg(url: str, **options) -> str:
    """A [polar_cloud] section for the cloud at url (a server_url option
    given replaces it); the webcam off unless asked for."""
    options.setdefault("webcam_enabled", "False")
    lines = ["[polar_cloud]",
             "server_url: %s" % (options.pop("server_url", url),)]
    lines += ["%s: %s" % (k, v) for k, v in options.items()]
    return "\n".join(lines) + "\n"


def start_provisioned(make_klippy, sim, server_url: Optional[str] = None,
                      extra_cfg: str = "", env: Optional[dict] = None,
                      start: bool = True, flavour: str = "klipper",
                      **options) -> Klippy:
    """A klippy whose printer is already registered with `sim` (server_url
    may point at a proxy in front of it); k.serial, k.state_path set."""
    k = make_klippy(flavour, extra_cfg=polar_cfg(server_url or sim.url,
                                                   **options) + extra_cfg,
                    env=env, extras={"polar_cloud": EXTRA}, start=False)
    k.state_path = k.workdir / "polar_cloud"
    k.serial = provision(k.state_path, sim)
    if start:
        k.start()
    return k


def polar_status(k: Klippy) -> dict:
    return k.query("polar_cloud")["polar_cloud"]


def wait_polar(k: Klippy, predicate, timeout: float = 60.) -> dict:
    sub = k.subscribe_objects({"polar_cloud": None})
    try:
        return sub.wait_for(lambda st: predicate(st.get("polar_cloud", {})),
                            timeout=timeout)["polar_cloud"]
    finally:
        sub.close()


def wait_objects(k: Klippy, objects: dict, predicate,
                 timeout: float = 60.) -> dict:
    """Wait until the subscribed printer objects satisfy predicate."""
    sub = k.subscribe_objects(objects)
    try:
        return sub.wait_for(predicate, timeout=timeout)
    finally:
        sub.close()


def register(k: Klippy, sim, email: str = EMAIL, pin: str = PIN) -> str:
    """Register through the console; return the serial once online."""
    out = k.subscribe_output()
    try:
        k.gcode("POLAR_REGISTER EMAIL=%s PIN=%s" % (email, pin))
        line = out.wait_for(r"registered, serial number (\w+)|registration"
                            r" failed", timeout=90)
    finally:
        out.close()
    match = re.search(r"serial number (\w+)", line)
    assert match, line
    serial = match.group(1)
    wait_polar(k, lambda st: st.get("state") == "online")
    return serial


def wait_online_again(k: Klippy, sim) -> None:
    """After a restart or a drop (k.hist from StateHistory.attach): online,
    with exactly one live session at the cloud."""
    k.hist.wait_for(lambda st: st["state"] == "online",
                    since=k.hist.mark() - 1)
    sim.wait_until(lambda: sim.live_sessions(k.serial) == 1, timeout=30)


def fresh_session(k: Klippy, sim) -> None:
    """RESTART: a new session, so the backoff starts again at 2 s."""
    k.restart()
    # From the re-subscription on, everything is the new session
    wait_online_again(k, sim)


def final_reports(sim, k: Klippy, job_id: str) -> list[dict]:
    """The final `job` reports the cloud received for job_id."""
    return [j for j in sim.received("job", serial=k.serial)
            if j["jobId"] == job_id]


def wait_final(sim, k: Klippy, job_id: str, since: float,
               timeout: float = 90.) -> dict:
    return sim.wait_for("job", lambda d: d["jobId"] == job_id, since=since,
                        serial=k.serial, timeout=timeout)


def wait_status(sim, k: Klippy, since: float, predicate,
                timeout: float = 90.) -> dict:
    return sim.wait_for("status", predicate, since=since, serial=k.serial,
                        timeout=timeout)


def print_local(k: Klippy, sim, name: str, **print_args) -> float:
    """Write a demo print (demo_print's arguments) and start it from
    klippy's console as a local print; the simulator time before it."""
    k.write_gcode(name, demo_print(**print_args))
    since = sim.now()
    k.gcode('SDCARD_PRINT_FILE FILENAME="%s"' % name)
    return since


def gcode_then_status(sim, k: Klippy, script: str, code: int,
                      timeout: float = 90.) -> dict:
    """Run a script and wait for the cloud to be told the status code."""
    since = sim.now()
    k.gcode(script)
    return wait_status(sim, k, since, lambda d: d["status"] == code,
                       timeout=timeout)


def tree_digest(path) -> str:
    """One hash over every file name and content below path."""
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            digest.update(full.encode())
            with open(full, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def polar_tracebacks(text: str) -> list[str]:
    """Tracebacks in a klippy.log that pass through polar_cloud or the
    libraries it drives (klippy's own, e.g. an MCU identify retry at
    start-up, are not ours)."""
    blocks: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("Traceback (most recent call last)"):
            j = i + 1
            while j < len(lines) and (lines[j].startswith(" ")
                                      or lines[j].startswith("During")
                                      or not lines[j].strip()):
                j += 1
            block = "\n".join(lines[max(0, i - 1):j + 1])
            if re.search(r"polar_cloud|socketio|engineio|websocket", block):
                blocks.append(block)
            i = j
        else:
            i += 1
    return blocks


def health_problems(k: Klippy, since: int = 0) -> list[str]:
    """What would show the module disturbed klippy: not ready, an
    unhandled exception, an MCU timing failure, or a traceback of ours
    (in klippy.log from byte offset `since`)."""
    problems = []
    state = k.info()["state"]
    if state != "ready":
        problems.append("klippy is %s" % (state,))
    text = k.log_text().encode("utf-8", "replace")[since:].decode(
        "utf-8", "replace")
    for bad in ("Unhandled exception", "Timer too close", "Rescheduled timer"):
        if bad in text:
            problems.append(bad)
    problems += polar_tracebacks(text)
    return problems
