#!/usr/bin/env bash
# Trains the world model from a fresh clone: renders the toy world with
# `fractal world export`, then runs train.py (PyTorch + diffusers, CPU,
# seeded) in tools/train/.venv. Needs PyPI once for the venv.
#   tools/train/train.sh OUT [train.py flags, e.g. --vae-minutes 10 --unet-minutes 44]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."
out="${1:?usage: train.sh OUT [train.py flags]}"; shift
venv="$here/.venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.9.1 diffusers==0.42.1 transformers==5.24.0 safetensors numpy
fi
(cd "$root" && cargo build --release -p fractal-cli)
fractal="$root/target/release/fractal"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$fractal" world export --split train --seeds 8 --out "$work/data"
"$fractal" model export-tiny --variant tiny-v1 "$work/tiny" >/dev/null  # for its CLIP tokenizer
"$venv/bin/python" "$here/train.py" "$work/data" "$work/tiny/tokenizer" "$out" "$@"
