"""Identity storage: key file mode, atomic writes, corruption handling."""
import base64
import json
import os
import stat
import uuid

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from klippy_extras.polar_cloud import identity
from klippy_extras.polar_cloud.identity import IdentityError, IdentityStore


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_key_created_private_and_signature_verifies(tmp_path):
    store = IdentityStore(str(tmp_path / "state"), "kl")
    public = store.create_key()
    assert mode(store.key_path) == 0o600
    assert mode(store.state_dir) == 0o700
    with open(store.key_path) as f:
        assert f.read().startswith("-----BEGIN RSA PRIVATE KEY-----")
    sig = base64.b64decode(store.sign("challenge-ü"))
    key = serialization.load_pem_public_key(public.encode())
    key.verify(sig, "challenge-ü".encode(), padding.PKCS1v15(),
                            hashes.SHA256())
    assert store.load() is None                    # key but no serial yet
    ident = store.save("KL000001", "https://x")
    assert mode(store.identity_path) == 0o600
    again = IdentityStore(store.state_dir, "kl").load()
    assert again.serial == "KL000001" and again.mac == ident.mac
    assert again.mfg_sn == "KL-" + ident.mac.replace(":", "")
    assert not [f for f in os.listdir(store.state_dir) if f.startswith(".tmp")]


def test_corrupt_files_are_clear_errors(tmp_path):
    store = IdentityStore(str(tmp_path), "kl")
    store.create_key()
    store.save("KL000001", "https://x")
    with open(store.key_path, "w") as f:
        f.write("garbage")
    with pytest.raises(IdentityError, match="corrupt"):
        IdentityStore(str(tmp_path), "kl").load()
    os.unlink(store.key_path)
    with pytest.raises(IdentityError, match="missing"):
        IdentityStore(str(tmp_path), "kl").load()
    with open(store.identity_path, "w") as f:
        f.write("{not json")
    with pytest.raises(IdentityError, match="corrupt"):
        IdentityStore(str(tmp_path), "kl").load()


def test_other_key_is_refused(tmp_path):
    store = IdentityStore(str(tmp_path), "kl")
    store.create_key()
    store.save("KL000001", "https://x")
    IdentityStore(str(tmp_path), "kl").create_key()     # key replaced
    with pytest.raises(IdentityError, match="does not match"):
        IdentityStore(str(tmp_path), "kl").load()


def test_wipe_keeps_machine_identity(tmp_path):
    store = IdentityStore(str(tmp_path), "kl")
    store.create_key()
    ident = store.save("KL000001", "https://x")
    store.wipe()
    assert not os.path.exists(store.key_path)
    fresh = IdentityStore(str(tmp_path), "kl")
    assert fresh.load() is None
    assert fresh.machine()["mac"] == ident.mac


def test_signing_is_done_outside_this_process(tmp_path):
    """klippy never loads cryptography: key work happens in a child."""
    import subprocess
    import sys
    code = (
        "import sys\n"
        "from klippy_extras.polar_cloud.identity import IdentityStore\n"
        "s = IdentityStore(sys.argv[1], 'kl')\n"
        "s.create_key(); s.save('KL1', 'x')\n"
        "t = IdentityStore(sys.argv[1], 'kl'); t.load(); t.sign('c')\n"
        "print(sorted(m for m in sys.modules if m.startswith('cryptography')))\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)],
                         capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.stdout.strip() == "[]"


def test_key_of_another_kind_is_refused(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    store = IdentityStore(str(tmp_path), "kl")
    store.create_key()
    store.save("KL000001", "https://x")
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    with open(store.key_path, "wb") as f:
        f.write(pem)
    with pytest.raises(IdentityError, match="corrupt"):
        IdentityStore(str(tmp_path), "kl").load()


def test_key_helper_imports_nothing_from_the_working_directory(
        tmp_path, monkeypatch):
    # klippy's working directory may hold anything; the helper child must
    # not pick up a module planted there
    planted = tmp_path / "cwd"
    (planted / "cryptography").mkdir(parents=True)
    marker = tmp_path / "imported"
    (planted / "cryptography" / "__init__.py").write_text(
        "open(%r, 'w').close()\n" % (str(marker),))
    monkeypatch.chdir(planted)
    store = IdentityStore(str(tmp_path / "state"), "kl")
    assert store.create_key().startswith("-----BEGIN PUBLIC KEY-----")
    assert not marker.exists()


@pytest.mark.parametrize("text", ["[1, 2]", "\"KL1\"", "7"])
def test_identity_that_is_not_an_object_names_the_file(tmp_path, text):
    store = IdentityStore(str(tmp_path), "kl")
    (tmp_path / "identity.json").write_text(text)
    with pytest.raises(IdentityError, match="identity.json is corrupt"):
        store.load()


# --- several printers on one host: the MAC rule ------------------------------

HOST = 0xB827EB123456
HOST_MAC = "B8:27:EB:12:34:56"


@pytest.fixture
def host(monkeypatch):
    """uuid.getnode() answers what the test sets in host.node."""
    class Host:
        node = HOST
    h = Host()
    monkeypatch.setattr(uuid, "getnode", lambda: h.node)
    return h


def instance(home, name, files=("config/printer.cfg",)):
    """A Klipper instance folder ~/<name>; its store at <name>/polar_cloud."""
    for rel in files:
        path = home / name / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    return IdentityStore(str(home / name / "polar_cloud"), "kl")


def is_local_unicast(mac):
    first = int(mac[:2], 16)
    return len(mac) == 17 and first & 0x02 and not first & 0x01


def test_default_instance_keeps_the_host_mac(tmp_path, host):
    default = instance(tmp_path / "home", "printer_data")
    instance(tmp_path / "home", "printer_data_2")
    assert default.machine() == {"mac": HOST_MAC, "mfg_sn": "KL-B827EB123456"}
    # A lone instance keeps it whatever its folder is called.
    assert instance(tmp_path / "a", "voron_data").machine()["mac"] == HOST_MAC
    assert instance(tmp_path / "b", ".polar").machine()["mac"] == HOST_MAC


def test_other_instance_gets_a_stable_local_mac(tmp_path, host):
    home = tmp_path / "home"
    instance(home, "printer_data")
    second = instance(home, "printer_data_2")
    third = instance(home, "printer_data_3")
    mac = second.machine()["mac"]
    assert is_local_unicast(mac) and mac != HOST_MAC
    assert second.machine()["mfg_sn"] == "KL-" + mac.replace(":", "")
    # the same host and folder give the same MAC: before the first
    # registration records it, after a RESTART, a reinstall of the module
    assert IdentityStore(second.state_dir, "kl").machine()["mac"] == mac
    assert third.machine()["mac"] not in (mac, HOST_MAC)
    second.save_machine()
    with open(second.identity_path) as f:
        assert json.load(f) == {"mac": mac}
    # recorded: a new network card does not change it
    host.node = 0xB827EB654321
    assert IdentityStore(second.state_dir, "kl").machine()["mac"] == mac
    assert third.machine()["mac"] != mac


def test_instances_without_a_default_name_all_differ(tmp_path, host):
    home = tmp_path / "home"
    stores = [instance(home, name)
              for name in ("printer_1_data", "printer_2_data", "voron_data")]
    macs = {store.machine()["mac"] for store in stores}
    assert len(macs) == 3 and all(map(is_local_unicast, macs))
    # An instance folder is one with a config/ of Klipper's or Moonraker's
    # or a polar_cloud identity; other folders beside it do not count.
    lone = tmp_path / "lone"
    (lone / "gcodes" / "config").mkdir(parents=True)
    (lone / "klipper" / "config").mkdir(parents=True)
    assert instance(lone, "voron_data").machine()["mac"] == HOST_MAC
    instance(lone, "trident_data", files=("config/moonraker.conf",))
    assert instance(lone, "voron_data").machine()["mac"] != HOST_MAC


def test_host_mac_recorded_by_another_instance_is_not_taken(tmp_path, host):
    # printer_data_2 registered before this rule existed, with the host MAC
    home = tmp_path / "home"
    old = instance(home, "printer_data_2")
    os.makedirs(old.state_dir)
    with open(old.identity_path, "w") as f:
        json.dump({"serial": "KL000007", "mac": HOST_MAC}, f)
    default = instance(home, "printer_data")
    assert is_local_unicast(default.machine()["mac"])
    assert old.machine()["mac"] == HOST_MAC


def test_unreadable_host_mac_gives_a_random_mac_recorded_once(tmp_path, host):
    # uuid.getnode() makes up a new multicast address each time it fails
    made = iter(range(1, 100))
    type(host).node = property(lambda self: 0x010000000000 | next(made) << 8)
    store = instance(tmp_path, "printer_data")
    first, second = store.machine()["mac"], store.machine()["mac"]
    assert is_local_unicast(first) and is_local_unicast(second)
    store.save_machine()
    recorded = store.machine()["mac"]
    assert is_local_unicast(recorded)
    assert IdentityStore(store.state_dir, "kl").machine()["mac"] == recorded
    store.create_key()
    assert store.save("KL000001", "https://x").mac == recorded
    store.wipe()
    assert IdentityStore(store.state_dir, "kl").machine()["mac"] == recorded


def test_recorded_mac_is_kept(tmp_path, host):
    home = tmp_path / "home"
    instance(home, "printer_data")
    second = instance(home, "printer_data_2")
    os.makedirs(second.state_dir)
    with open(second.identity_path, "w") as f:
        json.dump({"mac": "B8:27:EB:00:00:01"}, f)
    assert second.machine() == {"mac": "B8:27:EB:00:00:01",
                                "mfg_sn": "KL-B827EB000001"}
    second.save_machine()
    # Registered by an older version that recorded no MAC: it registered
    # with the host's, so it keeps that even as a further instance.
    with open(second.identity_path, "w") as f:
        json.dump({"serial": "KL000002"}, f)
    assert second.machine()["mac"] == HOST_MAC


IDLE_HELPER = """import json, os, sys
sys.stdin.read()
print(json.dumps({"policy": os.sched_getscheduler(0),
                  "nice": os.getpriority(os.PRIO_PROCESS, 0)}))
"""


def test_the_key_helper_runs_like_every_helper_child(tmp_path, monkeypatch):
    """One runner (children.py) for crypto and imaging: idle priority."""
    script = tmp_path / "helper.py"
    script.write_text(IDLE_HELPER)
    monkeypatch.setattr(identity, "KEY_HELPER", str(script))
    got = identity.run_crypto("public", b"pem")
    assert got["policy"] == getattr(os, "SCHED_IDLE", -1) or got["nice"] == 19


def test_a_key_helper_past_its_time_is_killed(tmp_path, monkeypatch):
    script = tmp_path / "helper.py"
    script.write_text("import time\nwhile True: time.sleep(1)\n")
    monkeypatch.setattr(identity, "KEY_HELPER", str(script))
    monkeypatch.setattr(identity, "CRYPTO_TIMEOUT", .5)
    with pytest.raises(IdentityError, match="took too long"):
        identity.run_crypto("keygen", b"")
