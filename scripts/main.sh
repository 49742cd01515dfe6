#!/usr/bin/env bash
# The main job on the built-in default, from a fresh machine with only Python 3.11:
# installs everything, then runs examples/quickstart.py (outputs under outputs/quickstart).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/install.sh"
venv="${LOUPE_VENV:-$repo/.venv}"
cd "$repo"
"$venv/bin/python" examples/quickstart.py --output-dir "${LOUPE_OUTPUT_DIR:-outputs/quickstart}" "$@"
