#!/usr/bin/env bash
# Regenerates fixtures/subtensor/ (runtime metadata and reference vectors for
# the subtensor backend's offline tests) from the bittensor 11.3.0 sdist.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/../../fixtures/subtensor"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --no-binary=:all: -d "$work" bittensor==11.3.0
tar -xzf "$work"/bittensor-11.3.0.tar.gz -C "$work" bittensor-11.3.0/tests/fixtures/golden.json
mkdir -p "$out"
python3 "$here/subtensor_vectors.py" "$work/bittensor-11.3.0/tests/fixtures/golden.json" "$out"
