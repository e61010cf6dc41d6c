# The printer's Polar Cloud identity: RSA key, serial number, state files
#
# Everything here does file I/O or crypto and therefore runs on the cloud
# session's thread, never on klippy's reactor.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from dataclasses import dataclass
from typing import Optional

from . import children
from .keyhelper import BAD_KEY_EXIT
from .statefiles import StateFileError as IdentityError
from .statefiles import ensure_state_dir, read_json, write_json, write_private_file

KEY_FILE = "key.pem"
IDENTITY_FILE = "identity.json"

# RSA work runs in a child process at low priority (keyhelper.py): key
# generation holds the GIL for tens of milliseconds (seconds on a Raspberry
# Pi), enough to starve klippy's reactor, and importing cryptography would
# add megabytes to klippy for one signature per connection.  The private
# key travels on pipes and in memory only.  -I: the child imports nothing
# from klippy's working directory or the user's site-packages.
KEY_HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          "keyhelper.py")
CRYPTO_TIMEOUT = 300.


class BadKey(Exception):
    """The PEM handed to the child is not a usable RSA private key."""


def run_crypto(op: str, data: bytes) -> dict:
    """One RSA operation in the key helper, started like every helper
    child (children.py: idle priority, stdin from memory, killed on its
    time limit)."""
    kids = children.Children(threading.Event())
    try:
        with children.input_file(data) as stdin:
            code, out, err = kids.run_helper(KEY_HELPER, [op],
                                             CRYPTO_TIMEOUT, stdin=stdin)
    except children.ChildTimeout:
        raise IdentityError("the key helper took too long") from None
    except (children.ChildError, children.ChildStopped) as e:
        raise IdentityError("cannot run the key helper: %s" % (e,)) from None
    if code == BAD_KEY_EXIT:
        raise BadKey()
    if code != 0:
        lines = err.strip().splitlines()
        raise IdentityError("the key helper failed: %s"
                            % (lines[-1] if lines else code,))
    try:
        return json.loads(out)
    except ValueError as e:
        raise IdentityError("the key helper answered garbage") from e


# The MAC and maker serial of an instance (docs/architecture.md, "State on
# disk").  Polar Cloud recognises a printer by them, so several klippy
# instances on one host (~/printer_data, ~/printer_data_2, ...) must not
# share them, or each registration takes over the other's printer.
DEFAULT_INSTANCE = "printer_data"
MULTICAST = 1 << 40         # bit 0x01 of the first octet, as a 48-bit int
MAX_SCAN = 1000             # entries looked at beside the instance folder


def format_mac(node: int) -> str:
    return ":".join("%02X" % ((node >> s) & 0xff) for s in range(40, -8, -8))


def stable_mac() -> str:
    """The host's MAC as uuid.getnode() gives it (what this module sent
    before it knew about instances)."""
    return format_mac(uuid.getnode())


def host_node() -> Optional[int]:
    """The host's hardware address, None when it cannot be read:
    uuid.getnode() then returns a random number with the multicast bit set,
    which no network card has."""
    node = uuid.getnode()
    return None if node & MULTICAST else node


def local_mac(seed: bytes) -> str:
    """A locally administered unicast MAC (0x02 set, 0x01 clear in the first
    octet) from the first six bytes of seed."""
    node = int.from_bytes(seed[:6], "big")
    return format_mac((node | (2 << 40)) & ~MULTICAST)


def instance_mac(host: int, state_dir: str) -> str:
    """The derived MAC of a further instance: stable for one host and one
    state folder, different for every state folder."""
    seed = "polar_cloud instance\0%012X\0%s" % (
        host, os.path.abspath(state_dir))
    return local_mac(hashlib.sha256(seed.encode("utf-8", "surrogateescape"))
                     .digest())


def random_mac() -> str:
    return local_mac(os.urandom(6))


def _is_instance_folder(path: str) -> bool:
    """A Klipper instance's data folder (~/printer_data and its kind)."""
    return any(os.path.isfile(os.path.join(path, *rel)) for rel in (
        ("config", "printer.cfg"), ("config", "moonraker.conf"),
        ("polar_cloud", IDENTITY_FILE)))


def other_instances(state_dir: str) -> list[str]:
    """The other instance folders beside this instance's folder (the one
    holding state_path)."""
    folder = os.path.dirname(os.path.abspath(state_dir))
    found = []
    try:
        with os.scandir(os.path.dirname(folder)) as entries:
            for n, entry in enumerate(entries):
                if n >= MAX_SCAN:
                    break
                if not (entry.is_dir() and _is_instance_folder(entry.path)):
                    continue
                try:
                    mine = os.path.samefile(entry.path, folder)
                except OSError:     # this instance's folder does not exist
                    mine = False
                if not mine:
                    found.append(entry.path)
    except OSError:
        pass
    return sorted(found)


def _recorded_mac(folder: str) -> Optional[str]:
    try:
        data = read_json(os.path.join(folder, "polar_cloud", IDENTITY_FILE))
    except IdentityError:
        return None
    return data.get("mac") if isinstance(data, dict) else None


def choose_mac(state_dir: str) -> str:
    """The MAC for an instance that has none recorded yet.

    The default instance (its folder is named printer_data, or no other
    instance sits beside it) keeps the host's MAC, unless another
    instance already recorded it; every other instance gets a locally
    administered MAC derived from the host's MAC and its state_path.  A
    host whose MAC cannot be read gets a random one (recorded once by
    save_machine)."""
    host = host_node()
    if host is None:
        return random_mac()
    mac = format_mac(host)
    others = other_instances(state_dir)
    name = os.path.basename(os.path.dirname(os.path.abspath(state_dir)))
    if (name == DEFAULT_INSTANCE or not others) \
            and mac not in (_recorded_mac(o) for o in others):
        return mac
    return instance_mac(host, state_dir)


@dataclass
class Identity:
    serial: str
    mac: str
    mfg_sn: str
    server: str
    key_fingerprint: str


class IdentityStore:
    """The files in state_path: key.pem (0600) and identity.json."""

    def __init__(self, state_dir: str, mfg: str):
        self.state_dir = state_dir
        self.mfg = mfg
        self.key_path = os.path.join(state_dir, KEY_FILE)
        self.identity_path = os.path.join(state_dir, IDENTITY_FILE)
        self._private: Optional[bytes] = None
        self._public: Optional[str] = None
    # Key handling: the private key is only ever parsed in the child
    def load_key(self) -> Optional[str]:
        """The public key (PEM), or None when there is no key file."""
        try:
            with open(self.key_path, "rb") as f:
                pem = f.read(64 * 1024)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise IdentityError("cannot read the printer key %s: %s"
                                % (self.key_path, e.strerror)) from e
        try:
            public = run_crypto("public", pem)["public"]
        except BadKey:
            raise IdentityError("the printer key %s is corrupt"
                                % (self.key_path,)) from None
        self._private, self._public = pem, public
        return public
    def create_key(self) -> str:
        ensure_state_dir(self.state_dir)
        try:
            made = run_crypto("keygen", b"")
        except IdentityError as e:
            raise IdentityError("cannot generate the printer key: %s"
                                % (e,)) from e
        # PKCS#1 PEM: readable by every RSA library (docs/protocol.md 2.1)
        pem = made["private"].encode("ascii")
        write_private_file(self.key_path, pem)
        self._private, self._public = pem, made["public"]
        return self._public
    def public_pem(self) -> str:
        if self._public is None and self.load_key() is None:
            raise IdentityError("the printer key %s is missing"
                                % (self.key_path,))
        return self._public
    def fingerprint(self) -> str:
        return hashlib.sha256(self.public_pem().encode("ascii")).hexdigest()
    def sign(self, challenge: str) -> str:
        self.public_pem()
        try:
            return run_crypto("sign", json.dumps({
                "pem": self._private.decode("ascii"),
                "data": challenge}).encode("ascii"))["signature"]
        except BadKey:
            raise IdentityError("the printer key %s is corrupt"
                                % (self.key_path,)) from None
    # Identity file
    def machine(self) -> dict:
        """MAC and maker serial, persisted once so they never change
        (choose_mac for a new instance)."""
        try:
            data = read_json(self.identity_path) or {}
        except IdentityError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        mac = data.get("mac")
        if not isinstance(mac, str) or len(mac) != 17:
            # Registered without a recorded MAC: it was the host's
            mac = stable_mac() if data.get("serial") \
                else choose_mac(self.state_dir)
        mfg_sn = "%s-%s" % (self.mfg.upper(), mac.replace(":", ""))
        return {"mac": mac, "mfg_sn": mfg_sn}
    def load(self) -> Optional[Identity]:
        """The registered identity, or None when unregistered."""
        data = read_json(self.identity_path)
        if data is None:
            return None
        if not isinstance(data, dict):
            raise IdentityError("%s is corrupt" % (self.identity_path,))
        if not data.get("serial"):
            return None
        if not isinstance(data["serial"], str):
            raise IdentityError("%s is corrupt" % (self.identity_path,))
        if self.load_key() is None:
            raise IdentityError(
                "the printer key %s is missing; delete the printer in Polar"
                " Cloud and register again" % (self.key_path,))
        fp = self.fingerprint()
        if data.get("key_fingerprint") not in (None, fp):
            raise IdentityError(
                "the printer key does not match the registered identity;"
                " delete the printer in Polar Cloud and register again")
        machine = self.machine()
        return Identity(serial=data["serial"], mac=machine["mac"],
                        mfg_sn=machine["mfg_sn"],
                        server=str(data.get("server", "")),
                        key_fingerprint=fp)
    def save(self, serial: str, server: str) -> Identity:
        machine = self.machine()
        fp = self.fingerprint()
        write_json(self.identity_path, {
            "serial": serial, "mac": machine["mac"], "server": server,
            "key_fingerprint": fp})
        return Identity(serial, machine["mac"], machine["mfg_sn"], server, fp)
    def save_machine(self) -> None:
        try:
            data = read_json(self.identity_path) or {}
        except IdentityError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        if data.get("mac"):
            return
        ensure_state_dir(self.state_dir)
        data.update(mac=self.machine()["mac"])
        write_json(self.identity_path, data)
    def wipe(self) -> None:
        """Forget the registration and the key (after unregister/delete)."""
        machine = self.machine()
        self._private = self._public = None
        for path in (self.key_path,):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if os.path.isdir(self.state_dir):
            write_json(self.identity_path, {"mac": machine["mac"]})
