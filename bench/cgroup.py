"""A CPU budget for the bench's klippys: a cgroup limited to a share of
one core, in short periods, the way a Raspberry Pi-class CPU that is
also busy with Moonraker, a web front-end and a camera streamer leaves
klippy a slice of its time.

    budget = CpuBudget("polar", 30)     # 30 % of one core, 5 ms periods
    budget.add(k.pid)                   # klippy; its children follow
    ...
    budget.close()

cgroup v1 (the `cpu` controller mounted at /sys/fs/cgroup/cpu):
cpu.cfs_period_us and cpu.cfs_quota_us.  cgroup v2: cpu.max in a child of
the bench's own cgroup (the `cpu` controller must be enabled for it).
Both need root, or a delegated cgroup.  Processes started by a process in
the group (klippy's helper children) stay in it; everything else (the
simulated MCU, the cloud simulator, the bench itself) stays out.
"""

from __future__ import annotations

import os
from pathlib import Path

V1_ROOT = Path("/sys/fs/cgroup/cpu")
V2_ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 5000


class BudgetError(RuntimeError):
    pass


def _v2_own_group() -> Path:
    with open("/proc/self/cgroup") as f:
        for line in f:
            hierarchy, _controllers, path = line.rstrip("\n").split(":", 2)
            if hierarchy == "0":
                return V2_ROOT / path.lstrip("/")
    raise BudgetError("no cgroup v2 hierarchy")


class CpuBudget:
    def __init__(self, name: str, percent: float,
                 period_us: int = PERIOD_US) -> None:
        if not 0 < percent <= 100:
            raise BudgetError("the CPU budget is a percentage of one core,"
                              " 1-100")
        self.percent = percent
        self.period_us = period_us
        self.quota_us = max(1000, int(period_us * percent / 100.))
        self.name = "polar-bench-%s-%d" % (name, os.getpid())
        self.path, self.version = self._create()

    def _create(self) -> tuple[Path, int]:
        errors = []
        if (V1_ROOT / "cpu.cfs_quota_us").exists():
            path = V1_ROOT / self.name
            try:
                path.mkdir(exist_ok=True)
                # The period first: a quota is checked against it
                (path / "cpu.cfs_period_us").write_text(str(self.period_us))
                (path / "cpu.cfs_quota_us").write_text(str(self.quota_us))
                return path, 1
            except OSError as e:
                errors.append("cgroup v1 at %s: %s" % (V1_ROOT, e))
                self._rmdir(path)
        try:
            parent = _v2_own_group()
            controllers = (parent / "cgroup.controllers").read_text().split()
            if "cpu" not in controllers:
                raise BudgetError("the cpu controller is not available in %s"
                                  % (parent,))
            path = parent / self.name
            path.mkdir(exist_ok=True)
            (path / "cpu.max").write_text("%d %d" % (self.quota_us,
                                                     self.period_us))
            return path, 2
        except (OSError, BudgetError) as e:
            errors.append("cgroup v2: %s" % (e,))
        raise BudgetError("cannot set up a CPU budget (run as root, or with"
                          " a delegated cgroup): " + "; ".join(errors))

    def describe(self) -> str:
        return "%g %% of one core (%d us every %d us, cgroup v%d)" % (
            self.percent, self.quota_us, self.period_us, self.version)

    def add(self, pid: int) -> None:
        """Move a process (all its threads) into the budget; the children
        it starts from now on are in it too."""
        (self.path / "cgroup.procs").write_text(str(pid))

    def pids(self) -> list[int]:
        try:
            text = (self.path / "cgroup.procs").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def throttled(self) -> tuple[int, float]:
        """(periods throttled, seconds throttled) so far."""
        stats = {}
        try:
            for line in (self.path / "cpu.stat").read_text().splitlines():
                key, value = line.split()
                stats[key] = int(value)
        except (OSError, ValueError):
            return 0, 0.
        if self.version == 1:
            return stats.get("nr_throttled", 0), \
                stats.get("throttled_time", 0) / 1e9
        return stats.get("nr_throttled", 0), \
            stats.get("throttled_usec", 0) / 1e6

    def close(self) -> None:
        """Move what is left back out and remove the group."""
        parent = self.path.parent / "cgroup.procs"
        for pid in self.pids():
            try:
                parent.write_text(str(pid))
            except OSError:
                pass
        self._rmdir(self.path)

    @staticmethod
    def _rmdir(path: Path) -> None:
        try:
            path.rmdir()
        except OSError:
            pass
