#!/usr/bin/env bash
# Issue 20, continuous half: CSpD on the stronger continuous family (scripts/train_continuous8.sh: 8x8 tokens of 16
# channels, a 4.7 M target and its 1.1 M same-family drafter). A scratch set holds the new family with the drafter
# trained on data as continuous role "small"; `mulosd train distill --continuous` moves a copy onto the target (role
# "distilled"); then `cspd` with the paper's exact ratio and bookkeeping, each drafter with and without trajectory
# alignment, against `car` in one process at batch 1 and batch 8 (scripts/results_report.sh, on the shipped set).
# Resumable: run it again after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/train_lib.sh   # stage NAME ARGS...: train once, resume if killed ($R: runs/)
. scripts/bench_lib.sh   # bench NAME ARGS...: run once, resume if killed ($O: docs/bench)
SET=${CSET:-$R/fmnist-32-c8}
CHAIN=${CHAIN:-teacher}  # --chain of the distillation (teacher or aligned)

for s in ctok8 ctarget8 cdrafter8; do
  [ -f "$R/$s/summary.json" ] || { echo "$R/$s is not trained: run scripts/train_continuous8.sh first" >&2; exit 1; }
done
[ -f "$SET/manifest.json" ] || $M pack --from fmnist-32 --out "$SET" --dtype fp16 \
  --continuous-tokenizer $R/ctok8/model --continuous-target $R/ctarget8/model --continuous-drafter small=$R/cdrafter8/model
stage cdistill8_$CHAIN distill --model "$SET" --continuous --drafter small --no-add-to-set \
  --samples "${CSAMPLES:-2000}" --positions 32 --chain "$CHAIN" --steps "${CSTEPS:-1000}" --batch-size 16 --lr 1e-3 \
  --warmup 50 --ema 0.99 --checkpoint-every 100
[ -f "$SET/continuous_drafter_distilled.json" ] || $M pack --from "$SET" --out "$SET" --dtype fp16 \
  --continuous-drafter distilled=$R/cdistill8_$CHAIN/model

# the set ships as fmnist-32's continuous family (scratch copy: $SET); its benches are in scripts/results_report.sh
# (full_cont8_b1, full_cont8_b8, cspd8_small_b1)
