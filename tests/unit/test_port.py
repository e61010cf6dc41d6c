"""What the session's collaborators may ask of it (port.py): the session
provides all of it, and the collaborators typed with it use nothing else."""
from __future__ import annotations

import inspect
import re

import pytest

from klippy_extras.polar_cloud import commands, jobs, reporting, snapshots
from klippy_extras.polar_cloud.port import CloudPort
from tests.unit.fakes import FakePort, make_session

PORT = {name for name in vars(CloudPort) if not name.startswith("_")} \
    | set(CloudPort.__annotations__)


def test_the_session_provides_the_whole_port(tmp_path):
    session = make_session(tmp_path)
    assert [name for name in sorted(PORT) if not hasattr(session, name)] \
        == []


def test_the_unit_tests_fake_provides_the_whole_port():
    assert [name for name in sorted(PORT) if not hasattr(FakePort(), name)] \
        == []


@pytest.mark.parametrize("module", [commands, jobs, reporting, snapshots],
                         ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_collaborators_use_only_the_port(module):
    used = set(re.findall(r"\bsession\.([A-Za-z_]\w*)",
                          inspect.getsource(module)))
    assert sorted(used - PORT) == []
