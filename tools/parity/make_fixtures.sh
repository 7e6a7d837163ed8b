#!/usr/bin/env bash
# Regenerates fixtures/parity/* from Python diffusers. Needs network access to
# PyPI once (torch, diffusers, transformers go into tools/parity/.venv).
# With fixture names (e.g. `make_fixtures.sh world-v1` after new world
# weights), only those text-to-video fixtures are remade.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."
venv="$here/.venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.9.1 diffusers==0.42.1 transformers==5.24.0 safetensors numpy accelerate
fi
(cd "$root" && cargo build --release -p fractal-cli)
if [ $# -gt 0 ]; then
  exec "$venv/bin/python" "$here/make_fixtures.py" "$root/target/release/fractal" "$@"
fi
"$venv/bin/python" "$here/make_wan_fixtures.py" "$root/fixtures/parity/wan"
"$venv/bin/python" "$here/make_wan_builtin_fixtures.py" "$root/target/release/fractal"
"$venv/bin/python" "$here/make_wan_shape_fixtures.py" "$root/target/release/fractal"
"$venv/bin/python" "$here/make_half_fixtures.py" "$root/target/release/fractal"
exec "$venv/bin/python" "$here/make_fixtures.py" "$root/target/release/fractal" "$@"
