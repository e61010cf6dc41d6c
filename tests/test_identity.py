"""Identity storage: key file mode, atomic writes, corruption handling."""
import base64
import os
import stat

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

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
                         cwd=os.path.dirname(os.path.dirname(__file__)))
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
