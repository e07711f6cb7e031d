#!/usr/bin/env bash
# The numbers in docs/METHODS.md: every method at its defaults comes from the full runs of
# scripts/results_report.sh (run that first); this script adds one `mulosd bench` run per batch size with
# non-default parameters of the peers (each with its own `ar` reference), then copies all four tables into the doc.
# A killed run continues where it stopped (--resume); a finished one is not redone.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench_lib.sh  # bench NAME ARGS...: run once, resume if killed
N_VAR=${N_VAR:-100}  # images per setting at batch 1
N_VAR_B8=${N_VAR_B8:-96}

VARIANTS=(--setting sd:gamma=2 --setting sd:gamma=8 --setting sjd:init=spatial --setting mcsjd:coupling=gumbel
          --setting lantern:delta=0.4 --setting zipar:window=4)
bench variants_b1 --methods ar "${VARIANTS[@]}" --num-images "$N_VAR" --batch-size 1
bench variants_b8 --methods ar "${VARIANTS[@]}" --num-images "$N_VAR_B8" --batch-size 8
.venv/bin/python scripts/bench_tables.py docs/METHODS.md "$O" full_b1 "Batch 1, every method at its defaults" \
  variants_b1 "Batch 1, other parameters" full_b8 "Batch 8, every method at its defaults" \
  variants_b8 "Batch 8, other parameters"
