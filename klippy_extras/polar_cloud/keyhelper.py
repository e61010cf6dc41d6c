# The printer key's RSA work, in a short-lived child process
#
# identity.py runs it as `python -I keyhelper.py <op>` with the input on
# stdin and reads one JSON object from stdout:
#   keygen            -> {"private": PEM, "public": PEM}
#   public  (PEM in)  -> {"public": PEM}
#   sign    ({"pem", "data"} in) -> {"signature": base64 of PKCS#1 v1.5 SHA-256}
# A PEM that is not a usable RSA private key exits with BAD_KEY_EXIT.
# identity.run_crypto starts it through children.py (idle priority); it
# paces its own CPU time (pacing.py), cryptography's imports included.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import base64
import json
import os
import sys

BAD_KEY_EXIT = 3


def public(key) -> str:
    from cryptography.hazmat.primitives import serialization
    return key.public_key().public_bytes(
        serialization.Encoding.PEM,
        serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def consistent(numbers) -> bool:
    """The private numbers agree with each other: what a damaged key file
    gets wrong, and what a CRT signature with a wrong part would leak."""
    p, q, d, e = numbers.p, numbers.q, numbers.d, numbers.public_numbers.e
    return (p > 2 and q > 2 and p * q == numbers.public_numbers.n
            and e % 2 == 1 and (e * d) % (p - 1) == 1
            and (e * d) % (q - 1) == 1 and numbers.dmp1 == d % (p - 1)
            and numbers.dmq1 == d % (q - 1) and (numbers.iqmp * q) % p == 1)


def load(pem: bytes):
    # OpenSSL's own check of a loaded key tests p and q for primality: 35 ms
    # in one call into C that no pacer can cut, at every hello, and under a
    # CPU quota klippy's reactor waits it out.  The key is the one keygen
    # made; checking that its numbers agree costs microseconds.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    try:
        key = serialization.load_pem_private_key(
            pem, password=None, unsafe_skip_rsa_key_validation=True)
    except (ValueError, TypeError):
        sys.exit(BAD_KEY_EXIT)
    if not (isinstance(key, rsa.RSAPrivateKey)
            and consistent(key.private_numbers())):
        sys.exit(BAD_KEY_EXIT)
    return key


def run(op: str, data: bytes) -> dict:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa
    if op == "keygen":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return {"private": key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()).decode("ascii"),
            "public": public(key)}
    if op == "public":
        return {"public": public(load(data))}
    req = json.loads(data)
    sig = load(req["pem"].encode("ascii")).sign(
        req["data"].encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())
    return {"signature": base64.b64encode(sig).decode("ascii")}


def paced():
    """Pace this child's CPU time from here on, its imports too, and on
    ticks (a module's body, typing's or inspect's, is 2 ms of Python)
    (pacing.py, loaded by its path: this script's folder is not a
    package here)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "polar_cloud_pacing", os.path.join(os.path.dirname(
            os.path.abspath(__file__)), "pacing.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.start(ticks=True)
    return module


def main() -> None:
    try:
        os.nice(10)
    except OSError:
        pass
    pacing = paced()
    sys.stdout.write(json.dumps(run(sys.argv[1], sys.stdin.buffer.read())))
    pacing.leave(0)     # no teardown of cryptography: unpaced CPU


if __name__ == "__main__":
    main()
