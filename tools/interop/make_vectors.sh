#!/usr/bin/env bash
# Regenerates fixtures/interop/bittensor11.json from the reference Python SDK.
# Usage: tools/interop/make_vectors.sh [--check rust_vectors.json]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q bittensor==11.3.0
fi
exec "$venv/bin/python" "$here/make_vectors.py" "$@"
