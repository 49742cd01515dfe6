#!/usr/bin/env bash
# The main job on the built-in default, from a fresh machine with only Python 3.11:
# installs everything, then runs examples/demo.py: tiny pre-training on synthetic data, then
# zero-shot detection and grounding on held-out images (outputs under outputs/demo).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/install.sh"
venv="${LOUPE_VENV:-$repo/.venv}"
cd "$repo"
"$venv/bin/python" examples/demo.py --output_dir "${LOUPE_OUTPUT_DIR:-outputs/demo}" "$@"
