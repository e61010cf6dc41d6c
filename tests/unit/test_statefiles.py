"""State files: atomic, private from the first byte, and every failure a
StateFileError that names the file."""
from __future__ import annotations

import os
import stat

import pytest

from klippy_extras.polar_cloud import statefiles
from klippy_extras.polar_cloud.statefiles import StateFileError


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_json_round_trip_is_private(tmp_path):
    folder = tmp_path / "polar_cloud"
    statefiles.ensure_state_dir(str(folder))
    path = str(folder / "job.json")
    statefiles.write_json(path, {"b": [1, 2], "a": "x"})
    assert statefiles.read_json(path) == {"a": "x", "b": [1, 2]}
    assert mode(folder) == 0o700 and mode(path) == 0o600
    assert os.listdir(folder) == ["job.json"]      # no temporary file left


def test_an_existing_folder_is_made_private(tmp_path):
    folder = tmp_path / "open"
    folder.mkdir(mode=0o755)
    statefiles.ensure_state_dir(str(folder))
    assert mode(folder) == 0o700


def test_a_missing_file_is_none(tmp_path):
    assert statefiles.read_json(str(tmp_path / "missing.json")) is None


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b""])
def test_a_corrupt_file_is_named(tmp_path, raw):
    path = tmp_path / "identity.json"
    path.write_bytes(raw)
    with pytest.raises(StateFileError, match="identity.json is corrupt"):
        statefiles.read_json(str(path))


def test_an_unreadable_file_is_named(tmp_path):
    path = tmp_path / "outbox.json"
    path.mkdir()                    # reading a folder fails with EISDIR
    with pytest.raises(StateFileError, match="cannot read .*outbox.json"):
        statefiles.read_json(str(path))


def test_a_folder_that_cannot_be_made_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StateFileError, match="cannot create state folder"):
        statefiles.ensure_state_dir(str(blocker / "polar_cloud"))


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "lab.json")
    statefiles.write_json(path, {"plate_clear": True})

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        statefiles.write_json(path, {"plate_clear": False})
    monkeypatch.undo()
    assert statefiles.read_json(path) == {"plate_clear": True}
    assert os.listdir(tmp_path) == ["lab.json"]
