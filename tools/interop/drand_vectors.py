#!/usr/bin/env python3
"""Timelocked commit-reveal (CRv4) vectors from the reference implementations.

Run by drand_vectors.sh in a venv with bittensor 11.3.0 (whose weights path
calls bittensor_core.get_encrypted_commit_v2) and bittensor-drand 2.0.0.
Writes fixtures/subtensor/crv4.json with:

- reveal_rounds: for several epoch states, tempos, reveal periods, block
  times and clock readings, the drand round both references encrypt a commit
  to. The clock is frozen with libfaketime (FAKETIME_LIB), so each case is
  exact.
- sdk_commit: a whole commit the SDK built, with the clock set so that its
  reveal round is 1000, whose pulse is public: our decryption must give back
  the payload.
- theirs_at_1000: payloads both references encrypted to round 1000 (the bare
  ciphertext, as a commit carries it, out of their `UserData` envelope).
- ours_at_1000: payloads our encoder (the timelock_encrypt example, OURS)
  encrypted to round 1000, each decrypted here by both references.
- call: the SDK's call data for commit_timelocked_mechanism_weights with the
  SDK's commit, against the recorded metadata.
- storage: the SDK's storage keys for what a commit reads, and the
  CommitRevealWeightsVersion default from the metadata.

Usage: drand_vectors.py METADATA OUT_JSON
"""
import datetime
import json
import os
import subprocess
import sys

# drand quicknet round 1000, as drand published it (public data).
ROUND_1000 = 1000
SIGNATURE_1000 = (
    "b44679b9a59af2ec876b1a6b1ad52ea9b1615fc3982b19576350f93447cb1125"
    "e342b73a8dd2bacbe47e4b6b63ed5e39"
)

CASES = [
    # (name, state, reveal_period, block_time, now)
    ("mainnet tempo 360", dict(last_epoch_block=4_000, pending_epoch_at=0, subnet_epoch_index=11,
                               tempo=360, blocks_since_last_step=200, current_block=4_200), 1, 12.0, 1_764_700_000),
    ("two epochs ahead", dict(last_epoch_block=4_000, pending_epoch_at=0, subnet_epoch_index=11,
                              tempo=360, blocks_since_last_step=200, current_block=4_200), 2, 12.0, 1_764_700_001),
    ("fast blocks", dict(last_epoch_block=60, pending_epoch_at=0, subnet_epoch_index=6,
                         tempo=10, blocks_since_last_step=7, current_block=67), 1, 0.25, 1_764_700_002),
    ("fast blocks, period 3", dict(last_epoch_block=60, pending_epoch_at=0, subnet_epoch_index=6,
                                   tempo=10, blocks_since_last_step=7, current_block=67), 3, 0.25, 1_800_000_000),
    ("head just before an epoch", dict(last_epoch_block=100, pending_epoch_at=0, subnet_epoch_index=3,
                                       tempo=50, blocks_since_last_step=48, current_block=148), 1, 12.0, 1_800_000_001),
    ("commit lands in an epoch block", dict(last_epoch_block=100, pending_epoch_at=0, subnet_epoch_index=3,
                                            tempo=50, blocks_since_last_step=49, current_block=149), 1, 12.0, 1_800_000_002),
    ("owner-triggered epoch", dict(last_epoch_block=100, pending_epoch_at=130, subnet_epoch_index=3,
                                   tempo=50, blocks_since_last_step=20, current_block=120), 2, 12.0, 1_800_000_003),
    ("starved subnet", dict(last_epoch_block=100, pending_epoch_at=0, subnet_epoch_index=3,
                            tempo=1_000, blocks_since_last_step=50_401, current_block=120), 1, 12.0, 1_800_000_004),
    ("tempo 1", dict(last_epoch_block=500, pending_epoch_at=0, subnet_epoch_index=500,
                     tempo=1, blocks_since_last_step=0, current_block=500), 1, 6.0, 1_800_000_005),
    ("block time 4.5 s", dict(last_epoch_block=1_000, pending_epoch_at=0, subnet_epoch_index=9,
                              tempo=99, blocks_since_last_step=30, current_block=1_030), 2, 4.5, 1_900_000_000),
]

HOTKEY = bytes(range(32))
UIDS = [0, 3, 7]
WEIGHTS = [65535, 1234, 0]
VERSION_KEY = 42

# Runs in a child under the frozen clock: both references' commit for one case.
CHILD = r"""
import json, sys, bittensor_core, bittensor_drand
a = json.loads(sys.argv[1])
kw = dict(uids=a["uids"], weights=a["weights"], version_key=a["version_key"],
          subnet_reveal_period_epochs=a["reveal_period"], block_time=a["block_time"],
          hotkey=bytes.fromhex(a["hotkey"]), **a["state"])
core_ct, core_round = bittensor_core.get_encrypted_commit_v2(**kw)
drand_ct, drand_round = bittensor_drand.get_encrypted_commit_v2(**kw)
print(json.dumps({"core": [core_ct.hex(), core_round], "drand": [drand_ct.hex(), drand_round]}))
"""


def frozen(now, args):
    """Both references' commit with the clock frozen at `now` (integer s)."""
    # An absolute date freezes libfaketime's clock ("@T" would start it running).
    date = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    env = dict(os.environ, LD_PRELOAD=os.environ["FAKETIME_LIB"], TZ="UTC",
               FAKETIME=date.strftime("%Y-%m-%d %H:%M:%S"))
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def case_args(state, reveal_period, block_time):
    return dict(state=state, reveal_period=reveal_period, block_time=block_time,
                uids=UIDS, weights=WEIGHTS, version_key=VERSION_KEY, hotkey=HOTKEY.hex())


def compact(n):
    """SCALE compact length (the sizes here stay below 2^14)."""
    if n < 64:
        return bytes([n << 2])
    assert n < 1 << 14
    return ((n << 2) | 1).to_bytes(2, "little")


def envelope(ct, round_):
    """The references' `UserData { encrypted_data, reveal_round }` around a
    bare ciphertext (what their decrypt_with_signature takes)."""
    return compact(len(ct)) + ct + round_.to_bytes(8, "little")


def unwrap(env):
    """The bare ciphertext inside a `UserData` envelope (what the chain stores)."""
    mode = env[0] & 3
    n, skip = {0: (env[0] >> 2, 1), 1: (int.from_bytes(env[:2], "little") >> 2, 2)}[mode]
    assert len(env) == skip + n + 8, "one UserData"
    return env[skip:skip + n]


def opens(lib, ct, round_):
    return lib.decrypt_with_signature(envelope(ct, round_), SIGNATURE_1000)


def payload_bytes(hotkey, uids, values, version_key):
    """SCALE (Vec<u8>, Vec<u16>, Vec<u16>, u64), written out by hand."""
    out = compact(len(hotkey)) + hotkey
    for xs in (uids, values):
        out += compact(len(xs)) + b"".join(x.to_bytes(2, "little") for x in xs)
    return out + version_key.to_bytes(8, "little")


def main():
    metadata_path, out_path = sys.argv[1], sys.argv[2]
    import bittensor_core
    import bittensor_drand
    from bittensor._transport.codec import RuntimeCodec

    rounds = []
    for name, state, period, block_time, now in CASES:
        got = frozen(now, case_args(state, period, block_time))
        assert got["core"][1] == got["drand"][1], (name, got)
        rounds.append(dict(name=name, state=state, reveal_period=period, block_time=block_time,
                           now=now, reveal_round=got["core"][1]))
        print(f"{name}: reveal round {got['core'][1]}")

    # A whole SDK commit that opens with round 1000: shifting the clock by
    # 3 s shifts the round by exactly one.
    name, state, period, block_time, _ = CASES[2]
    args = case_args(state, period, block_time)
    t0 = 1_692_806_000
    r0 = frozen(t0, args)["core"][1]
    t = t0 + 3 * (ROUND_1000 - r0)
    got = frozen(t, args)
    assert got["core"][1] == ROUND_1000 and got["drand"][1] == ROUND_1000, got
    payload = payload_bytes(HOTKEY, UIDS, WEIGHTS, VERSION_KEY)
    sdk_ct = got["core"][0]
    for lib in (bittensor_core, bittensor_drand):
        for ct in (got["core"][0], got["drand"][0]):
            assert opens(lib, bytes.fromhex(ct), ROUND_1000) == payload, lib.__name__
    sdk_commit = dict(case=name, state=state, reveal_period=period, block_time=block_time, now=t,
                      reveal_round=ROUND_1000, hotkey=HOTKEY.hex(), uids=UIDS, values=WEIGHTS,
                      version_key=VERSION_KEY, payload=payload.hex(), ciphertext=sdk_ct,
                      drand_ciphertext=got["drand"][0])

    plaintexts = [payload, payload_bytes(bytes([9] * 32), [1], [65535], 0), b"fractal"]
    theirs = []
    for p in plaintexts:
        for who, lib in (("bittensor_core", bittensor_core), ("bittensor_drand", bittensor_drand)):
            env, r = lib.encrypt_at_round(p, ROUND_1000)
            assert r == ROUND_1000
            ct = unwrap(env)
            assert ct == bittensor_core.inner_ciphertext(env)
            theirs.append(dict(by=who, plaintext=p.hex(), ciphertext=ct.hex()))

    ours = []
    for p in plaintexts:
        ct = subprocess.run([os.environ["OURS"], str(ROUND_1000), p.hex()], check=True,
                            capture_output=True, text=True).stdout.strip()
        ct_bytes = bytes.fromhex(ct)
        for lib in (bittensor_core, bittensor_drand):
            assert opens(lib, ct_bytes, ROUND_1000) == p, lib.__name__
        ours.append(dict(plaintext=p.hex(), ciphertext=ct,
                         decrypted_by=["bittensor_core", "bittensor_drand"]))

    blob = open(metadata_path, "rb").read()
    codec = RuntimeCodec(blob, spec_version=461, transaction_version=1,
                         spec_name="node-subtensor", ss58_format=42)
    call = codec.compose_call("SubtensorModule", "commit_timelocked_mechanism_weights", {
        "netuid": 1, "mecid": 0, "commit": "0x" + sdk_ct, "reveal_round": ROUND_1000,
        "commit_reveal_version": 4})
    storage = {}
    for item, params in (("CommitRevealWeightsVersion", []), ("LastEpochBlock", [1]),
                         ("PendingEpochAt", [1]), ("SubnetEpochIndex", [1]),
                         ("BlocksSinceLastStep", [1]), ("RevealPeriodEpochs", [1]),
                         ("Tempo", [1])):
        entry = codec.storage_entry("SubtensorModule", item)
        storage[item] = dict(params=params, key_hex="0x" + codec.storage_key(entry, params).hex(),
                             default_hex="0x" + entry.default_bytes.hex())

    out = dict(
        source="tools/interop/drand_vectors.sh: bittensor 11.3.0 (bittensor-core 0.1.5) and "
               "bittensor-drand 2.0.0 from PyPI, clock frozen by libfaketime",
        quicknet_round_1000_signature=SIGNATURE_1000,
        slot_duration_ms=codec.constant("Aura", "SlotDuration"),
        reveal_rounds=rounds,
        sdk_commit=sdk_commit,
        theirs_at_1000=theirs,
        ours_at_1000=ours,
        call=dict(function="commit_timelocked_mechanism_weights", netuid=1, mecid=0,
                  reveal_round=ROUND_1000, commit_reveal_version=4,
                  data_hex="0x" + codec.call_data(call).hex()),
        storage=storage,
    )
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
