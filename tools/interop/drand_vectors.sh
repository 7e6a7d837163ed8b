#!/usr/bin/env bash
# Regenerates fixtures/subtensor/crv4.json (timelocked commit-reveal vectors)
# from the reference implementations on PyPI: bittensor 11.3.0 (its weights
# path, bittensor-core) and bittensor-drand 2.0.0. Needs libfaketime (Debian
# package faketime, installed here if missing) to freeze the clock the
# references read, and builds our side (the timelock_encrypt example).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

lib=/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1
if [ ! -e "$lib" ]; then
    apt-get update -qq && apt-get install -y -qq faketime
fi

python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q bittensor==11.3.0 bittensor-drand==2.0.0

(cd "$root" && cargo build -q --release -p fractal-chain --features subtensor --example timelock_encrypt)
target="${CARGO_TARGET_DIR:-$root/target}"

FAKETIME_LIB="$lib" OURS="$target/release/examples/timelock_encrypt" \
    "$work/venv/bin/python" "$here/drand_vectors.py" "$root/fixtures/subtensor/metadata-spec461.scale" "$root/fixtures/subtensor/crv4.json"
