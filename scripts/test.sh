#!/usr/bin/env bash
# The whole test suite, from a fresh machine with only Python 3.11: installs everything, then
# runs pytest (extra arguments are passed on, e.g. `-m "not slow"` or `-x`).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/install.sh"
venv="${LOUPE_VENV:-$repo/.venv}"
# Debian's Chromium (and playwright) for the Space's browser test.
bash "$repo/scripts/install_browser.sh" "$venv"
cd "$repo"
# Nothing may be fetched from the Hub at test time: everything is built or shipped locally.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec "$venv/bin/python" -m pytest "$@"
