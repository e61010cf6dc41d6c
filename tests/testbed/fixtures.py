"""pytest fixtures for tests that run a real klippy (import from conftest.py).

    from tests.testbed.fixtures import make_klippy  # noqa: F401

    @pytest.fixture(scope="module", params=["klipper", "kalico"])
    def klippy(request, make_klippy):
        k = make_klippy(request.param, extra_cfg="[polar_cloud]\\n...",
                        extras={"polar_cloud": REPO / "klippy_extras/polar_cloud"})
        yield k
        k.stop()     # optional: make_klippy stops everything at module end

`make_klippy` is module-scoped: start one klippy per flavour per test module.
At teardown it stops every klippy it made (the extras' links stay: they are
idempotent, and other test runs may be using them), and
if any test of the module failed copies the logs (klippy.log, klippy.out,
simmcu.log, printer.cfg) to tests/artifacts/<module>/<workdir>/.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest

from tests.testbed.klippy import REPO, Klippy, link_extra

ARTIFACTS = REPO / "tests" / "artifacts"

KlippyFactory = Callable[..., Klippy]


def copy_artifacts(k: Klippy, dest: Path) -> Path:
    """Copy a klippy's logs and config into dest/<workdir name>/."""
    out = dest / k.workdir.name
    out.mkdir(parents=True, exist_ok=True)
    for src in (k.log_path, k.stdout_path, k.simmcu_log_path, k.cfg_path):
        if src.exists():
            shutil.copy2(src, out / src.name)
    return out


@pytest.fixture(scope="module")
def make_klippy(request: pytest.FixtureRequest,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[KlippyFactory]:
    """Factory: make_klippy(flavour, extra_cfg="", env=None, extras=None,
    start=True, timeout=60, simmcu_args=None, workdir=None) -> a (started)
    Klippy.

    extras maps extra names to package directories to link_extra() first.
    workdir: the klippy's data folder (e.g. <home>/printer_data_2), made
    if missing; a fresh temporary one by default.
    """
    made: list[Klippy] = []
    failed_before = request.session.testsfailed

    def factory(flavour: str = "klipper", extra_cfg: str = "",
                env: dict | None = None, extras: dict[str, Path] | None = None,
                start: bool = True, timeout: float = 60,
                simmcu_args: list[str] | None = None,
                workdir: Path | None = None) -> Klippy:
        for name, src in (extras or {}).items():
            link_extra(flavour, src, name)
        if workdir is None:
            workdir = tmp_path_factory.mktemp("klippy-%s-" % (flavour,))
        k = Klippy(workdir, flavour, extra_cfg, env, simmcu_args=simmcu_args)
        made.append(k)
        if start:
            k.start(timeout=timeout)
        return k

    yield factory

    for k in made:
        k.stop()
    if request.session.testsfailed > failed_before:
        dest = ARTIFACTS / Path(str(request.node.name)).stem
        for k in made:
            copy_artifacts(k, dest)
