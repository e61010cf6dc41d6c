# The files in state_path: written atomically, 0600 in a 0700 folder,
# so a crash or a power cut never leaves half a file, and nothing secret
# is ever readable by others.  Callers run on the session thread.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Optional


class StateFileError(Exception):
    """The state folder or its files cannot be used."""


def write_private_file(path: str, data: bytes) -> None:
    """Write atomically with mode 0600 from the first byte on."""
    dirname = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dirname)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(dirname, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def write_json(path: str, obj: Any) -> None:
    write_private_file(path, json.dumps(obj, indent=1, sort_keys=True)
                       .encode("utf-8"))


def read_json(path: str) -> Optional[Any]:
    """None when the file does not exist; StateFileError when unreadable."""
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 20)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateFileError("cannot read %s: %s" % (path, e.strerror)) from e
    try:
        return json.loads(raw.decode("utf-8"))
    except ValueError as e:
        raise StateFileError("%s is corrupt (not JSON)" % (path,)) from e


def ensure_state_dir(path: str) -> None:
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
    except OSError as e:
        raise StateFileError("cannot create state folder %s: %s"
                            % (path, e.strerror)) from e
