#!/usr/bin/env bash
# The full `mulosd bench` runs behind docs/RESULTS.md: every method, 1000 images each at batch 1 (400 at batch 8),
# classifier and Inception FID. The discrete family (ar and its seven accelerations) and the continuous family
# (car and cspd) run as separate processes, each timing its methods against its own AR baseline in that process.
# Hours on 2 cores: each run checkpoints after every round and this script resumes a killed one (run it again);
# a finished run is not redone. Needs `make fid` once.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench_lib.sh  # bench NAME ARGS...: run once, resume if killed
N=${N_FULL:-1000}   # images per setting at batch 1
N_B8=${N_B8:-400}   # images per setting at batch 8 (the same distribution; this table is about speed)
DISCRETE=ar,sd,sjd,mcsjd,lantern,gsd,zipar,pjd,eagle2,mulo
# MuLo-SD's default (preset=ours) beside the paper's rule and r = 4; at batch 8 in rounds of 40 images, so that
# continuous batching refills its 8 slots within a round (every other method decodes batches of 8 as before)
MULO=(--setting mulo:preset=paper --setting mulo:r=4)
bench full_b8 --preset full --methods $DISCRETE "${MULO[@]}" --num-images "$N_B8" --batch-size 8 --round-images 40
bench full_b1 --preset full --methods $DISCRETE "${MULO[@]}" --num-images "$N" --batch-size 1
# The continuous family. fmnist-32's (8x8 tokens of 16 channels, scripts/train_continuous8.sh): car against cspd
# with the paper's exact ratio and bookkeeping and the distilled drafter (scripts/distill_continuous_report.sh), with
# and without trajectory alignment, and the public code's approximate relaxation + bookkeeping; the drafter trained
# on data (role small) in a shorter run. The short batch-8 run first.
CONT=(--setting cspd:drafter=distilled --setting cspd:drafter=distilled,align=false
      --setting cspd:drafter=distilled,relax=42,independent=true)
bench full_cont8_b8 --preset full --methods car "${CONT[@]}" --num-images "$N_B8" --batch-size 8
bench full_cont8_b1 --preset full --methods car "${CONT[@]}" --num-images "$N" --batch-size 1
bench cspd8_small_b1 --preset full --methods car,cspd --setting cspd:align=false --num-images "${N_SMALL:-200}" \
  --batch-size 1
# The earlier continuous family (16x16 tokens of 4 channels, a 14x smaller drafter; now the set fmnist-32-c16): the
# numbers docs/CSPD.md explains. cspd twice: the paper's method (defaults) and the public code's approximation.
PUBLIC=(--setting cspd:relax=42,independent=true)
bench full_cont_b8 --preset full --model fmnist-32-c16 --methods car,cspd "${PUBLIC[@]}" --num-images "$N_B8" --batch-size 8
bench full_cont_b1 --preset full --model fmnist-32-c16 --methods car,cspd "${PUBLIC[@]}" --num-images "$N" --batch-size 1
.venv/bin/python scripts/bench_tables.py docs/RESULTS.md "$O" full_b1 "Batch 1, discrete tokens" \
  full_b8 "Batch 8, discrete tokens" full_cont8_b1 "Batch 1, continuous tokens" full_cont8_b8 \
  "Batch 8, continuous tokens" cspd8_small_b1 "Batch 1, continuous tokens, the drafter trained on data"
