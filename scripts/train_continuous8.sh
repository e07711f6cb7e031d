#!/usr/bin/env bash
# Issue 20's stronger continuous-token family for fmnist-32 (8x8 tokens of 16 channels, as MAR's 16-channel
# tokens): a factor-4 KL tokenizer, then a target with a wider diffusion head trained for several epochs with an
# EMA of its weights, and CSpD's same-family drafter (role small). About an hour on 2 CPU cores, minutes on a GPU
# (DEVICE=cuda DTYPE=bfloat16): every stage checkpoints and re-running this script resumes a killed one
# (train_lib.sh). TARGET_STEPS and DRAFTER_STEPS are fixed up front (the learning-rate schedule depends on them).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/train_lib.sh  # stage NAME ARGS...: train once, resume if killed
DEV=(--device "${DEVICE:-cpu}" --dtype "${DTYPE:-float32}")

stage ctok8 kl-tokenizer --downsample 4 --channels 32 --z-channels 32 --token-dim 16 --kl-weight 1e-4 \
  --steps 1200 --batch-size 64 --lr 2e-3 --warmup 50 --checkpoint-every 100 "${DEV[@]}"
CTOK=$R/ctok8/model
stage ctarget8 car --tokenizer $CTOK --dim 192 --layers 8 --heads 6 --head-width 256 --head-depth 3 \
  --sample-steps 10 --head-batch-mul 4 --bf16 --steps "${TARGET_STEPS:-2600}" --batch-size 64 --lr 1e-3 --warmup 200 \
  --ema 0.999 --checkpoint-every 100 "${DEV[@]}"
# CSpD's drafter for that target: the same family 4.4x smaller (1.08 M against 4.73 M parameters; the paper's MAR-B
# drafts for MAR-L, 2-5x), trained on data like the target; scripts/distill_continuous_report.sh then distils it.
stage cdrafter8 car --tokenizer $CTOK --dim 128 --layers 4 --heads 4 --head-width 128 --head-depth 2 \
  --sample-steps 10 --head-batch-mul 4 --bf16 --steps "${DRAFTER_STEPS:-2000}" --batch-size 64 --lr 2e-3 --warmup 100 \
  --ema 0.999 --checkpoint-every 100 "${DEV[@]}"
