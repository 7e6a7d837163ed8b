#!/usr/bin/env python3
"""Interop vectors from the reference Python SDK (bittensor 11).

Writes fixtures/interop/bittensor11.json, which the Rust tests read, so CI
needs no Python. Run via ./tools/interop/make_vectors.sh (makes its own venv).

With --check FILE it instead verifies btauth/1 headers that the Rust side
signed (written by `FRACTAL_INTEROP_OUT=FILE cargo test -p fractal-http
rust_signed_vectors`) with the Python `http_auth.verify`, proving interop in
the other direction.
"""
import argparse
import base64
import json
import pathlib
import sys

import bittensor as bt
import bittensor_core as core
from bittensor import http_auth

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "fixtures" / "interop" / "bittensor11.json"
DEV = "bottom drive obey lake curtain smoke basket hold race lonely fit walk"
OTHER = "legal winner thank year wave sausage worth useful legal winner thank yellow"


def key_entry(kind, source, kp):
    data = json.loads(core.serialized_keypair_to_keyfile_data(kp))
    return {"kind": kind, "source": source, "keyfile": data}


def make():
    keys = [
        key_entry("mnemonic", DEV, core.Keypair.create_from_mnemonic(DEV, core.CRYPTO_SR25519)),
        key_entry("mnemonic", OTHER, core.Keypair.create_from_mnemonic(OTHER, core.CRYPTO_SR25519)),
        key_entry("uri", "//Alice", core.Keypair.create_from_uri("//Alice")),
        key_entry("uri", "//Bob//stash", core.Keypair.create_from_uri("//Bob//stash")),
        key_entry("uri", f"{OTHER}//fractal/1", core.Keypair.create_from_uri(f"{OTHER}//fractal/1")),
    ]
    alice = core.Keypair.create_from_uri("//Alice")
    bob = core.Keypair.create_from_uri("//Bob")
    plaintext = core.serialized_keypair_to_keyfile_data(alice)
    password = "correct horse battery staple"
    blob = core.encrypt_keyfile_data(plaintext, password)
    btauth = []
    for method, path, body, receiver in [
        ("POST", "/v1/generate", b'{"prompt":"a red fox running"}', bob.ss58_address),
        ("GET", "/v1/audit?job=00ff&k=3", b"", bob.ss58_address),
        ("post", "/x", b"\x00\x01binary", None),
    ]:
        nonce = 1_764_000_000_123_456_789
        headers = http_auth.sign(alice, method=method, path=path, body=body,
                                 receiver_ss58=receiver, nonce_ns=nonce)
        payload = http_auth.build_payload(scheme="sr25519", method=method, path=path, body=body,
                                          nonce_ns=nonce, sender_ss58=alice.ss58_address,
                                          receiver_ss58=receiver)
        btauth.append({
            "method": method, "path": path, "body_b64": base64.b64encode(body).decode(),
            "receiver": receiver, "nonce_ns": nonce, "headers": headers,
            "payload": payload.decode(),
        })
    doc = {
        "generator": f"tools/interop/make_vectors.py with bittensor {bt.__version__}",
        "keys": keys,
        "nacl": {"password": password, "plaintext": plaintext.decode(),
                 "blob_b64": base64.b64encode(blob).decode()},
        "btauth": btauth,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {OUT}")


def check(path):
    doc = json.loads(pathlib.Path(path).read_text())
    ok = 0
    for v in doc["btauth"]:
        caller = http_auth.verify(v["headers"], base64.b64decode(v["body_b64"]),
                                  method=v["method"], path=v["path"],
                                  self_hotkey_ss58=v["receiver"], now_ns=v["nonce_ns"],
                                  nonce_store=http_auth.InMemoryNonceStore())
        assert caller.hotkey_ss58 == v["sender"], caller
        ok += 1
    print(f"python accepted {ok} rust-signed btauth/1 requests")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--check")
    a = ap.parse_args()
    check(a.check) if a.check else make()
