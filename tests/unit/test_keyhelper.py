"""The printer key's RSA work (keyhelper.py), the child process identity.py
runs: key generation, the public key, signatures, and a clear exit for a
key that is not an RSA private key."""
from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from klippy_extras.polar_cloud import keyhelper
from klippy_extras.polar_cloud.identity import KEY_HELPER


@pytest.fixture(scope="module")
def pair():
    return keyhelper.run("keygen", b"")


def test_keygen_gives_a_pkcs1_key_and_its_public_key(pair):
    assert pair["private"].startswith("-----BEGIN RSA PRIVATE KEY-----")
    assert pair["public"].startswith("-----BEGIN PUBLIC KEY-----")
    key = serialization.load_pem_private_key(pair["private"].encode(), None)
    assert key.key_size == 2048
    assert keyhelper.run("public", pair["private"].encode()) == {
        "public": pair["public"]}


def test_the_signature_verifies_with_the_public_key(pair):
    request = json.dumps({"pem": pair["private"], "data": "challenge \u00e9"})
    signature = keyhelper.run("sign", request.encode())["signature"]
    public = serialization.load_pem_public_key(pair["public"].encode())
    public.verify(base64.b64decode(signature), "challenge \u00e9".encode(),
                  padding.PKCS1v15(), hashes.SHA256())


@pytest.mark.parametrize("pem", [
    b"", b"-----BEGIN RSA PRIVATE KEY-----\ngarbage\n",
    ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())])
def test_not_an_rsa_private_key_exits_with_its_own_code(pem):
    with pytest.raises(SystemExit) as exited:
        keyhelper.load(pem)
    assert exited.value.code == keyhelper.BAD_KEY_EXIT


def damaged(pem: str, **change) -> bytes:
    """The key with some of its private numbers changed (written without
    OpenSSL's check, as a damaged file would be)."""
    numbers = serialization.load_pem_private_key(
        pem.encode(), None).private_numbers()
    fields = {name: getattr(numbers, name) for name in (
        "p", "q", "d", "dmp1", "dmq1", "iqmp")}
    fields.update(change)
    key = rsa.RSAPrivateNumbers(
        public_numbers=numbers.public_numbers, **fields).private_key(
            unsafe_skip_rsa_key_validation=True)
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def test_a_key_whose_numbers_disagree_exits_with_its_own_code(pair):
    numbers = serialization.load_pem_private_key(
        pair["private"].encode(), None).private_numbers()
    for change in ({"dmp1": numbers.dmp1 ^ 2}, {"dmq1": numbers.dmq1 + 2},
                   {"iqmp": numbers.iqmp ^ 4}, {"d": numbers.d ^ 8},
                   {"p": numbers.q, "q": numbers.p}):
        with pytest.raises(SystemExit) as exited:
            keyhelper.load(damaged(pair["private"], **change))
        assert exited.value.code == keyhelper.BAD_KEY_EXIT, change
    assert keyhelper.consistent(keyhelper.load(damaged(
        pair["private"])).private_numbers())


def test_run_as_identity_py_runs_it(pair):
    done = subprocess.run([sys.executable, "-I", KEY_HELPER, "public"],
                          input=pair["private"].encode(),
                          capture_output=True, timeout=60)
    assert done.returncode == 0
    assert json.loads(done.stdout) == {"public": pair["public"]}
    done = subprocess.run([sys.executable, "-I", KEY_HELPER, "public"],
                          input=b"not a key", capture_output=True,
                          timeout=60)
    assert done.returncode == keyhelper.BAD_KEY_EXIT and done.stdout == b""
