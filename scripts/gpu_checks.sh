#!/usr/bin/env bash
# The GPU checks of a session that is lent a GPU machine, in one run (see ../shared/VERIFIED_RECIPES.md):
# the CUDA cases of the device tests, then the pre-training step benchmark on the tiny and paper
# presets (bf16, several batch sizes, ratios to the backbone, pairs/s, peak memory, MFU), the data
# pipeline against the step, and open_clip with identical towers.
#
# Prepare here (once): download the wheels the GPU machine lacks into .whl/ (ignored through
# .git/info/exclude), as VERIFIED_RECIPES.md lists; then run on the device with `.whl` carried:
#   bash scripts/gpu_checks.sh            # results under $OUT (or outputs/gpu_checks here)
# Rehearse on a CPU with LOUPE_GPU_CHECKS_DEVICE=cpu (small sizes, the same code paths).
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
out="${OUT:-outputs/gpu_checks}"
mkdir -p "$out"
device="${LOUPE_GPU_CHECKS_DEVICE:-cuda}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$repo/src:$repo"
else
  export PYTHONPATH="$repo/src:$repo"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 -c "import torch, transformers, timm, loupe_hf; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
  2>&1 | tee "$out/imports.txt" || exit 1

# 1. Device correctness: every CUDA case of the device test module (CPU cases run too).
python3 -m pytest -q -p no:cacheprovider -rs tests/test_devices.py 2>&1 | tee "$out/test_devices.txt"

# 2. Step time: tiny at batch 256, paper at 32 and 128 (the largest that fits is found by trying).
if [ "$device" = cuda ]; then
  tiny=(--batch-size 256) paper=(--batch-size 32 128) steps=5 dtype=bf16
else
  tiny=(--batch-size 8) paper=(--batch-size 2) steps=1 dtype=fp32
fi
common=(--device "$device" --dtype "$dtype" --steps "$steps" --image-pooling mean --malloc default
        --unsil-warmup-steps 2 --unsil-train-steps 2)
python3 benchmarks/pretraining_step.py --preset tiny "${tiny[@]}" "${common[@]}" \
  --unsil-variants tiny > "$out/pretraining_step_tiny.json" 2> "$out/pretraining_step_tiny.log"
python3 benchmarks/pretraining_step.py --preset paper "${paper[@]}" "${common[@]}" \
  --unsil-variants paper > "$out/pretraining_step_paper.json" 2> "$out/pretraining_step_paper.log"

# 3. The data pipeline against the step, and open_clip with identical towers (open_clip optional:
#    carried in .whl/ when downloaded; skipped with a note otherwise).
if [ "$device" = cuda ]; then workers=(0 4 8) batch=256 batches=16 oc=(--batch-size 32 128 --rounds 2); else workers=(0 1) batch=8 batches=4 oc=(--batch-size 2 --rounds 1); fi
python3 benchmarks/data_pipeline.py --device "$device" --dtype "$dtype" --batch-size "$batch" \
  --workers "${workers[@]}" --batches "$batches" --model-steps "$steps" > "$out/data_pipeline.json" 2> "$out/data_pipeline.log"
if python3 -c "import open_clip" 2>/dev/null; then
  python3 benchmarks/open_clip_comparison.py --preset paper --device "$device" --dtype "$dtype" \
    "${oc[@]}" --steps "$steps" > "$out/open_clip_paper.json" 2> "$out/open_clip_paper.log"
else
  echo "open_clip not installed: add open-clip-torch (and ftfy) wheels to .whl/" > "$out/open_clip_paper.log"
fi
ls -l "$out"
