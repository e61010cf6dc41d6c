"""helperhost.py and children.HelperHost: the helpers forked from one
small process per klippy, paced from their first instruction."""
from __future__ import annotations

import os
import signal
import threading

import pytest

from klippy_extras.polar_cloud import children
from tests.testbed.helpers import children_running, poll_until

SCRIPT = """\
import os, sys, time
what = sys.argv[1]
if what == "echo":
    sys.stdout.write(sys.stdin.read().upper() + " " + os.getcwd())
elif what == "fds":
    print(sorted(int(fd) for fd in os.listdir("/proc/self/fd"))[:3],
          len(os.listdir("/proc/self/fd")))
elif what == "sched":
    print(os.sched_getscheduler(0), os.getpriority(0, 0))
elif what == "finders":
    print(" ".join(getattr(f, "__name__", type(f).__name__)
                   for f in sys.meta_path))
elif what == "ticking":
    import signal
    print(signal.getitimer(signal.ITIMER_REAL)[1],
          callable(signal.getsignal(signal.SIGALRM)))
elif what == "trust":
    trust = sys.modules.get("polar_cloud_trust")
    if trust is not None and trust.context is not None:
        print(len(trust.context.get_ca_certs()), trust.bundle)
elif what == "fail":
    sys.stderr.write("broken\\n")
    sys.exit(3)
elif what == "crash":
    raise ValueError("no")
else:
    while True:
        time.sleep(1)
"""


@pytest.fixture
def host(tmp_path):
    script = tmp_path / "helper.py"
    script.write_text(SCRIPT)
    host = children.HelperHost([str(script)])
    yield host, str(script)
    host.stop()


def run(host, what, stdin=None, timeout=30., stop=None):
    h, script = host
    kids = children.Children(stop or threading.Event(), h)
    if stdin is None:
        return kids.run_helper(script, [what], timeout)
    with children.input_file(stdin) as f:
        return kids.run_helper(script, [what], timeout, stdin=f)


def test_a_helper_gets_its_args_stdin_and_exit_code(host):
    code, out, err = run(host, "echo", b"hello")
    assert (code, err) == (0, "")
    assert out.decode().startswith("HELLO ")
    assert run(host, "fail") == (3, b"", "broken\n")
    code, _out, err = run(host, "crash")
    assert code == 1 and err.strip().endswith("ValueError: no")


def test_a_helper_inherits_nothing_but_its_three_streams(host):
    _code, out, _err = run(host, "fds")
    # 0, 1, 2 and the descriptor listdir itself opened
    assert out.decode().split() == ["[0,", "1,", "2]", "4"]


def test_helpers_run_at_idle_priority(host):
    _code, out, _err = run(host, "sched")
    policy, nice = out.split()
    assert int(policy) == getattr(os, "SCHED_IDLE", -1) or int(nice) == 19


def test_the_hosts_import_pacer_stays_in_the_host(host):
    # It would count the child's CPU since its last call: a download's
    # first import after the transfer paused it for minutes
    _code, out, _err = run(host, "finders")
    assert "PacedImports" not in out.decode() and "PathFinder" in out.decode()


def test_a_helper_is_paced_on_ticks_from_its_first_line(host):
    _code, out, _err = run(host, "ticking")
    assert out.split() == [b"0.0005", b"True"]


def test_helpers_get_the_ca_bundle_loaded_once_by_the_host(host):
    from klippy_extras.polar_cloud import tlstrust
    found = []

    def loaded():
        _code, out, _err = run(host, "trust")
        found[:] = out.decode().split()
        return found
    # The host loads it a certificate at a time while it has nothing to do
    poll_until(loaded, timeout=30)
    assert int(found[0]) > 50 and found[1] == tlstrust.default_ca_certs()


def test_the_time_limit_kills_the_helper(host):
    with pytest.raises(children.ChildTimeout):
        run(host, "forever", timeout=.5)
    # Reaped by the host before run_helper returned
    assert children_running(os.getpid(), "helper.py") == []


def test_kill_all_ends_a_running_helper_at_once(host):
    h, script = host
    stop = threading.Event()
    kids = children.Children(stop, h)
    outcome: list = []

    def wait():
        try:
            kids.run_helper(script, ["forever"], 600.)
        except children.ChildStopped as e:
            outcome.append(e)
    waiter = threading.Thread(target=wait)
    waiter.start()
    poll_until(lambda: children_running(os.getpid(), "helper.py"), 10,
               "the helper")
    stop.set()
    kids.kill_all()
    waiter.join(30.)
    assert not waiter.is_alive() and len(outcome) == 1
    assert kids.tasks == set()
    assert children_running(os.getpid(), "helper.py") == []


def test_a_host_that_died_is_started_again(host):
    h, _script = host
    assert run(host, "fail")[0] == 3
    first = h.proc.pid
    os.kill(first, signal.SIGKILL)
    h.proc.wait()
    assert run(host, "fail")[0] == 3
    assert h.proc.pid != first


def test_the_host_and_its_helpers_end_with_their_socket(host):
    """klippy's process ending closes its end: the host kills its
    helpers and leaves, nothing is left running."""
    h, script = host
    kids = children.Children(threading.Event(), h)
    waiter = threading.Thread(
        target=lambda: pytest.raises(children.ChildError, kids.run_helper,
                                     script, ["forever"], 600.))
    waiter.start()
    [helper] = poll_until(lambda: children_running(os.getpid(), "helper.py"),
                          10, "the helper")
    proc = h.proc
    h.control.close()
    assert proc.wait(30.) == 0
    waiter.join(30.)
    assert not waiter.is_alive()
    poll_until(lambda: not os.path.exists("/proc/%d" % (helper,)), 30,
               "the helper gone")


def test_an_unknown_script_is_refused(host, tmp_path):
    h, _script = host
    kids = children.Children(threading.Event(), h)
    with pytest.raises(children.ChildError, match="no such helper"):
        kids.run_helper(str(tmp_path / "missing.py"), [], 30.)


def test_a_host_that_cannot_start_costs_nothing_each_time(tmp_path,
                                                          monkeypatch):
    """A host that dies at once (a broken install): every helper asked
    for gets a clear error, and no descriptor is left behind each time."""
    broken = tmp_path / "helperhost.py"
    broken.write_text("import sys\nsys.stderr.write('broken host\\n')\n"
                      "sys.exit(1)\n")
    monkeypatch.setattr(children, "HOST_SCRIPT", str(broken))
    host = children.HelperHost([])
    kids = children.Children(threading.Event(), host)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(children.ChildError, match="broken host"):
            kids.run_helper(str(tmp_path / "any.py"), [], 30.)
    assert len(os.listdir("/proc/self/fd")) == before
