#!/usr/bin/env python3
"""Cuts the subtensor fixtures out of the bittensor 11.3.0 source release.

The SDK's test suite ships `tests/fixtures/golden.json`: runtime metadata of
a local subtensor node (spec 461) and what the SDK encoded and decoded
against that node (call data, signer payloads, signed extrinsics, storage
keys and values, runtime API answers). We keep the metadata as a .scale file
and the SubtensorModule-relevant vectors as JSON, so the Rust tests check our
encoding and decoding offline against the reference SDK's.

Usage: subtensor_vectors.py GOLDEN_JSON OUT_DIR
"""
import json
import sys

golden_path, out = sys.argv[1], sys.argv[2]
g = json.load(open(golden_path))


def scale_bytes(hexstr):
    return bytes.fromhex(hexstr[2:] if hexstr.startswith("0x") else hexstr)


# `state_call Metadata_metadata_at_version(15)` answers Option<OpaqueMetadata>:
# strip the Some tag and the compact length to get the "meta..." blob.
raw = scale_bytes(g["metadata"]["v15_hex"])
assert raw[0] == 1, "metadata missing"
mode = raw[1] & 3
skip = {0: 1, 1: 2, 2: 4}[mode]
blob = raw[1 + skip:]
assert blob[:4] == b"meta", blob[:4]
open(f"{out}/metadata-spec{g['network']['spec_version']}.scale", "wb").write(blob)

keep = {
    "source": "bittensor 11.3.0 sdist, tests/fixtures/golden.json (MIT), cut by tools/interop/subtensor_vectors.sh",
    "network": g["network"],
    "calls": [c for c in g["calls"] if c["module"] in ("SubtensorModule", "Balances")],
    "signature_payloads": g["signature_payloads"],
    "extrinsics": g["extrinsics"],
    "ss58": g["ss58"],
    "storage_keys": [k for k in g["storage_keys"] if k["pallet"] in ("System", "SubtensorModule")],
    "storage_values": [v for v in g["storage_values"] if v["storage_function"] == "Account"],
    "runtime_calls": [c for c in g["runtime_calls"] if c["api"] in ("NeuronInfoRuntimeApi", "SubnetInfoRuntimeApi", "AccountNonceApi")],
    # The block the reads above were made at, as the node's RPC returned it.
    "block": {
        "block_hash": g["block"]["block_hash"],
        "header": g["block"]["raw"]["block"]["header"],
        "extrinsics": g["block"]["raw"]["block"]["extrinsics"],
    },
    # System::Events of that block (extrinsic 2 succeeded), and their key.
    "events": {
        "key_hex": [k["key_hex"] for k in g["storage_keys"] if k["storage_function"] == "Events"][0],
        "raw_hex": g["events"]["raw_hex"],
    },
}
assert g["events"]["block_hash"] == g["block"]["block_hash"]
with open(f"{out}/golden.json", "w") as f:
    json.dump(keep, f, indent=1)
    f.write("\n")
print(f"wrote {out}/metadata-spec{g['network']['spec_version']}.scale ({len(blob)} bytes) and {out}/golden.json")
