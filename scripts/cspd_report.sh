#!/usr/bin/env bash
# The CSpD measurements behind docs/CSPD.md's tables on the earlier continuous family (the set fmnist-32-c16, which
# was fmnist-32's continuous family when they were measured): `mulosd bench` runs (each one process, settings
# interleaved, each timed against `car` run in the same process), the surrogate-bias toy and the ratio's terms,
# then the tables are copied into the doc. A killed run continues where it stopped (--resume); a finished one is
# not redone. About an hour on 2 cores. fmnist-32's own family: scripts/results_report.sh (full_cont8_*).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench_lib.sh  # bench NAME ARGS...: run once, resume if killed
N_B1=${N_B1:-100}  # images per setting at batch 1
N_B8=${N_B8:-200}  # images per setting at batch 8
PUBLIC=relax=42,independent=true  # the public code's ratio and bookkeeping (approximate)

# the paper's method (defaults: gamma 4, pre-fill 0.05, aligned, relax 1, prefix acceptance) and its ablations:
# draft length, alignment, pre-fill, the public code's relaxation and bookkeeping one at a time and together
bench cspd_b1 --model fmnist-32-c16 --methods car,cspd --setting cspd:gamma=2 --setting cspd:relax=42 --setting cspd:relax=42,align=false \
  --setting cspd:independent=true --setting cspd:$PUBLIC --setting cspd:$PUBLIC,align=false \
  --setting cspd:$PUBLIC,prefill=0 --setting cspd:$PUBLIC,prefill=0.15 --setting cspd:gamma=8,$PUBLIC \
  --num-images "$N_B1" --batch-size 1
# the same car and public-code rows with another seed: the run-to-run noise of the quality columns
bench cspd_b1_seed1 --model fmnist-32-c16 --methods car --setting cspd:$PUBLIC --setting cspd:gamma=8,$PUBLIC --num-images "$N_B1" \
  --batch-size 1 --seed 1
# pre-fill against the quality cost of the approximate bookkeeping, at gamma 8
bench cspd_b1_prefill --model fmnist-32-c16 --methods car --setting cspd:gamma=8,$PUBLIC,prefill=0.15 --setting cspd:gamma=8,$PUBLIC,prefill=0.3 \
  --setting cspd:gamma=8,independent=true,prefill=0.15 --num-images "$N_B1" --batch-size 1
bench cspd_b8 --model fmnist-32-c16 --methods car,cspd --setting cspd:$PUBLIC --setting cspd:gamma=8,$PUBLIC --num-images "$N_B8" --batch-size 8
.venv/bin/python scripts/cspd_bias.py --doc docs/CSPD.md
.venv/bin/python scripts/cspd_diagnose.py --model fmnist-32-c16 --variances learned,fixed_small --drafters small --aligns true \
  --marker diagnose --doc docs/CSPD.md
.venv/bin/python scripts/cspd_diagnose.py --doc docs/CSPD.md   # fmnist-32's family (marker diagnose8)
.venv/bin/python scripts/bench_tables.py docs/CSPD.md "$O" cspd_b1 "Batch 1: the paper's method and its ablations" \
  cspd_b1_seed1 "Batch 1, seed 1: run-to-run noise" cspd_b1_prefill "Batch 1: pre-fill with the approximate bookkeeping" \
  cspd_b8 "Batch 8"
