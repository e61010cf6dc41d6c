# Registration handed over through a one-time file in state_path
#
# scripts/register.sh writes the e-mail and PIN into state_path/
# register.request (0600, in the 0700 state folder, linked into place so
# it appears whole and never replaces another request).  The session
# thread takes it (rename: exactly one of the module and the script wins),
# reads it and deletes it at once, registers, and answers in
# register.result (0600, atomic, no PIN), which the script reads and
# deletes.  Nothing of this goes through G-code, the API or a log.
#
# Both sides live here.  Standard library only and no relative imports:
# the script loads this file by path, without the rest of the package.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import errno
import json
import os
import secrets
import stat
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

REQUEST_FILE = "register.request"
RESULT_FILE = "register.result"
# Working names (temporary, taken, withdrawn) all start with this
WORK_PREFIX = ".register."
# The module renames a request here before reading it
TAKEN_FILE = ".register.request.taken"
MAX_SIZE = 4096
# A request nobody took for this long (klippy was down, the script was
# killed) is refused instead of registering the printer by surprise
MAX_AGE = 600.
# Working files older than this are leftovers of a killed script or klippy
SWEEP_AGE = 60.
FORMAT = 1


class HandoffError(Exception):
    """A request or result that cannot be used; the text is safe to show."""

    def __init__(self, message: str, request_id: str = ""):
        super().__init__(message)
        self.request_id = request_id


@dataclass
class Request:
    request_id: str
    email: str
    pin: str = field(repr=False)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _write_private(path: str, data: bytes, replace: bool) -> None:
    """Write path with mode 0600 from the first byte on, appearing whole.

    replace=False links the file into place and fails with
    FileExistsError when path exists; replace=True renames over it.
    """
    dirname = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=WORK_PREFIX + "tmp-", dir=dirname)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    _fsync_dir(dirname)


def _read_private(path: str) -> Optional[tuple[bytes, os.stat_result]]:
    """The bytes of a small regular file (never through a symlink), or None
    when it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise HandoffError("%s is a symbolic link" % (
                os.path.basename(path),)) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise HandoffError("%s is not a regular file"
                               % (os.path.basename(path),))
        if st.st_size > MAX_SIZE:
            raise HandoffError("%s is too big" % (os.path.basename(path),))
        return os.read(fd, MAX_SIZE + 1), st
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def sweep(state_dir: str, now: Optional[float] = None) -> int:
    """Delete working files left by a script or klippy killed between
    writing and deleting one (they may hold a PIN); return how many."""
    now = time.time() if now is None else now
    try:
        names = os.listdir(state_dir)
    except OSError:
        return 0
    count = 0
    for name in names:
        if not name.startswith(WORK_PREFIX):
            continue
        path = os.path.join(state_dir, name)
        try:
            if now - os.lstat(path).st_mtime > SWEEP_AGE:
                os.unlink(path)
                count += 1
        except OSError:
            pass
    return count


# The script's side

def prepare_state_dir(state_dir: str) -> None:
    """Make sure the state folder exists (0700) and belongs to us.

    A request made by another user (root) could not be read or deleted by
    klippy, so that is refused here.
    """
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        st = os.stat(state_dir)
    except OSError as e:
        raise HandoffError("cannot create %s: %s"
                           % (state_dir, e.strerror)) from None
    if not stat.S_ISDIR(st.st_mode):
        raise HandoffError("%s is not a folder" % (state_dir,))
    if st.st_uid != os.geteuid():
        raise HandoffError("%s belongs to another user: run this as the user"
                           " Klipper runs as" % (state_dir,))
    if stat.S_IMODE(st.st_mode) != 0o700:
        try:
            os.chmod(state_dir, 0o700)      # as the module keeps it
        except OSError:
            pass


def write_request(state_dir: str, email: str, pin: str) -> str:
    """Leave a one-time request for the module; return its id."""
    prepare_state_dir(state_dir)
    # A result left from an earlier run would be mistaken for ours
    _unlink(os.path.join(state_dir, RESULT_FILE))
    request_id = secrets.token_hex(8)
    data = json.dumps({"format": FORMAT, "id": request_id, "email": email,
                       "pin": pin}).encode("utf-8")
    try:
        _write_private(os.path.join(state_dir, REQUEST_FILE), data,
                       replace=False)
    except FileExistsError:
        raise HandoffError("a registration request is already waiting for"
                           " this printer (is register.sh running already?)"
                           ) from None
    except OSError as e:
        raise HandoffError("cannot write the request in %s: %s"
                           % (state_dir, e.strerror)) from None
    return request_id


def request_waiting(state_dir: str) -> bool:
    return os.path.lexists(os.path.join(state_dir, REQUEST_FILE))


def withdraw_request(state_dir: str) -> bool:
    """Remove a request the module has not taken yet.

    True when it was still there (and is gone now), False when the module
    took it first.  A rename decides: only one side can win.
    """
    path = os.path.join(state_dir, REQUEST_FILE)
    mine = os.path.join(state_dir, ".register.request.withdrawn-%d"
                        % (os.getpid(),))
    try:
        os.rename(path, mine)
    except FileNotFoundError:
        return False
    _unlink(mine)
    return True


def take_result(state_dir: str, request_id: str) -> Optional[dict]:
    """The module's answer to our request, deleted once read; else None."""
    path = os.path.join(state_dir, RESULT_FILE)
    try:
        got = _read_private(path)
    except (HandoffError, OSError):
        return None
    if got is None:
        return None
    try:
        result = json.loads(got[0].decode("utf-8"))
    except ValueError:
        return None      # not whole yet cannot happen (rename); foreign
    if not isinstance(result, dict) or result.get("id") != request_id:
        return None
    _unlink(path)
    return result


# The module's side (the session thread)

def take_request(state_dir: str,
                 now: Optional[float] = None) -> Optional[Request]:
    """Take, read and delete a waiting request; None when there is none.

    HandoffError for a request that cannot be used (it is deleted too);
    its text never holds the PIN.
    """
    path = os.path.join(state_dir, REQUEST_FILE)
    taken = os.path.join(state_dir, TAKEN_FILE)
    try:
        os.rename(path, taken)
    except FileNotFoundError:
        return None
    try:
        got = _read_private(taken)
    finally:
        _unlink(taken)
    if got is None:
        return None
    raw, st = got
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError:
        raise HandoffError("the registration request is not JSON") from None
    if not isinstance(data, dict):
        raise HandoffError("the registration request is malformed")
    request_id = data.get("id")
    request_id = request_id if isinstance(request_id, str) \
        and request_id.isalnum() and len(request_id) <= 64 else ""
    email, pin = data.get("email"), data.get("pin")
    if not request_id or not isinstance(email, str) \
            or not isinstance(pin, str):
        raise HandoffError("the registration request is malformed",
                           request_id)
    now = time.time() if now is None else now
    if now - st.st_mtime > MAX_AGE:
        raise HandoffError("the registration request is too old (written"
                           " %d min ago); run register.sh again"
                           % ((now - st.st_mtime) // 60,), request_id)
    return Request(request_id, email.strip(), pin.strip())


def write_result(state_dir: str, request_id: str, ok: bool,
                 serial: str = "", reason: str = "",
                 already: bool = False) -> None:
    """Answer a request (never with the PIN)."""
    _write_private(os.path.join(state_dir, RESULT_FILE), json.dumps({
        "format": FORMAT, "id": request_id, "ok": bool(ok),
        "serial": serial, "reason": reason, "already": bool(already),
    }).encode("utf-8"), replace=True)
