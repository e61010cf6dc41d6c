"""The soak (tests/testbed/soak.py) for a few minutes.  The
long runs are `scripts/soak.sh --minutes 720`; see docs/testing.md."""
from __future__ import annotations

import pytest

from tests.testbed import soak


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_short_soak(tmp_path):
    assert soak.main(["--minutes", "6", "--fault-every", "1",
                      "--job-every", "1", "--workdir",
                      str(tmp_path / "soak")]) == 0
