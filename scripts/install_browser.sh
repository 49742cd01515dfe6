#!/usr/bin/env bash
# Installs what the browser test of the Space (tests/test_space.py, marked slow) needs: Debian's
# chromium and chromium-driver (apt-get, when /usr/bin/chromium is missing) and the playwright
# Python package into the virtual environment given as $1 (default: .venv in the repository).
# Safe to re-run: it installs only what is missing and says what it did. It never runs
# `playwright install` (that downloads browsers); the test launches the Debian chromium instead.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-${LOUPE_VENV:-$repo/.venv}}"

if [ -x /usr/bin/chromium ]; then
  echo "[install_browser] chromium already installed: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
else
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "[install_browser] /usr/bin/chromium is missing and there is no apt-get; install chromium by hand" >&2
    exit 1
  fi
  sudo=()
  if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
  echo "[install_browser] installing chromium and chromium-driver with apt-get"
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  echo "[install_browser] installed: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "[install_browser] no virtual environment at $venv (run scripts/install.sh first)" >&2
  exit 1
fi
if "$venv/bin/python" -c "import playwright" >/dev/null 2>&1; then
  echo "[install_browser] playwright already installed in $venv"
else
  echo "[install_browser] installing playwright into $venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check playwright
  echo "[install_browser] installed playwright into $venv"
fi
