#!/usr/bin/env bash
# Issue 14's longer recipe, for a CPU (about 10 min) or a GPU: LOUPE with a curriculum that makes
# captions differ by shape first, on a 16x16 token grid.
#
#   0. (SHAPE_STEPS > 0 only) a CMC-only backbone on single objects captioned by their shape alone
#      ("an image of a star."), so that shape is the only thing that tells captions apart: shape is
#      read far better, boxes fit worse (docs/design_choices.md, "Captions that name the shape
#      alone");
#   1. a CMC-only backbone on single objects whose captions name size and colour only sometimes, so
#      shape is what tells captions apart (continued from step 0 if it ran; STAGE1_SHAPE_SHARE of
#      its captions name the shape alone);
#   2. full LOUPE on the usual scenes of 1-4 objects, continued from step 1, its captions still
#      naming size and colour only sometimes;
#   3. the evaluation on 256 validation images and on the second renderer (`--renderer second`),
#      error decomposition included, as JSON.
#
#   bash scripts/shape_recipe.sh                          # results under $OUT (or outputs/shape_recipe)
#   LOUPE_RECIPE_SCALE=smoke bash scripts/shape_recipe.sh  # a few steps of each stage, to rehearse
#
# On a CPU the model is `tiny-fine-grid` (ResNet-10 tower, 64 px, tokens on a 16x16 grid: the main
# job's model, trained longer, with two DataLoader workers drawing the images at its 64 px); on
# CUDA it is `tiny-128` (the same grid at 128 px), in bf16
# at batch 256 with DataLoader workers. PRESET, STAGE1_CONFIG (JSON of LoupeConfig fields for
# the first stage; the others inherit them), SHAPE_STEPS (default 0: no step 0), STAGE1_STEPS,
# STAGE1_SHAPE_SHARE (default 0), STAGE2_STEPS, STAGE2_OMIT_ATTRIBUTES and SEED (default 0, the
# training seed of every stage) override.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
out="${OUT:-outputs/shape_recipe}"
mkdir -p "$out"
python="${LOUPE_PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
shape_steps="${SHAPE_STEPS:-0}"

if [ "${LOUPE_RECIPE_SCALE:-full}" = smoke ]; then
  stage1="${STAGE1_STEPS:-2}" stage2="${STAGE2_STEPS:-2}" eval_samples=8
  preset="${PRESET:-tiny-fine-grid}" config="${STAGE1_CONFIG:-{\}}"
  run=(--per_device_train_batch_size 8)
  sampling='{"shapley_num_samples": 4, "shapley_token_num_samples": 4}'
elif "$python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  stage1="${STAGE1_STEPS:-1500}" stage2="${STAGE2_STEPS:-1500}" eval_samples=256
  preset="${PRESET:-tiny-128}" config="${STAGE1_CONFIG:-{\}}"
  run=(--per_device_train_batch_size 256 --bf16 true --dataloader_num_workers 8 --learning_rate 1e-3)
  sampling='{}'
else
  stage1="${STAGE1_STEPS:-600}" stage2="${STAGE2_STEPS:-300}" eval_samples=256
  preset="${PRESET:-tiny-fine-grid}" config="${STAGE1_CONFIG:-{\}}"
  run=(--per_device_train_batch_size 64 --keep_freed_memory true --dataloader_num_workers 2)
  sampling='{}'
fi
merged=$("$python" -c 'import json, sys; print(json.dumps({**json.loads(sys.argv[1]), **json.loads(sys.argv[2])}))' "$config" "$sampling")
common=(--save_steps 500 --num_eval_samples 0 --report_to none --seed "${SEED:-0}" "${run[@]}")

start=(--preset "$preset" --config_overrides "$merged")
if [ "$shape_steps" -gt 0 ]; then
  echo "[recipe] stage 0: backbone on single objects named by shape, $shape_steps steps ($preset, $config)" >&2
  "$python" examples/pretrain.py --output_dir "$out/stage0" "${start[@]}" --ablation backbone \
    --synthetic_max_objects 1 --synthetic_shape_caption_share 1 --max_steps "$shape_steps" "${common[@]}"
  start=(--model_name_or_path "$out/stage0" --config_overrides "$sampling")
fi

echo "[recipe] stage 1: backbone on single objects, $stage1 steps ($preset, $config)" >&2
"$python" examples/pretrain.py --output_dir "$out/stage1" "${start[@]}" --ablation backbone \
  --synthetic_max_objects 1 --synthetic_omit_attributes true \
  --synthetic_shape_caption_share "${STAGE1_SHAPE_SHARE:-0}" --max_steps "$stage1" "${common[@]}"

echo "[recipe] stage 2: full LOUPE on scenes, from stage 1, $stage2 steps" >&2
"$python" examples/pretrain.py --output_dir "$out/stage2" --model_name_or_path "$out/stage1" \
  --ablation loupe --config_overrides "$sampling" \
  --synthetic_omit_attributes "${STAGE2_OMIT_ATTRIBUTES:-true}" --max_steps "$stage2" "${common[@]}"

for renderer in training second; do
  echo "[recipe] evaluation ($renderer renderer)" >&2
  "$python" examples/run_evaluation.py --checkpoint "$out/stage2" --task synthetic \
    --num_samples "$eval_samples" --renderer "$renderer" --output_json "$out/eval_$renderer.json"
done
ls -l "$out"
