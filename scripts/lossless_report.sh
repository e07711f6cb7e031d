#!/usr/bin/env bash
# The lossless runs behind docs/METHODS.md's "Lossless methods" tables: every exact method of the discrete family
# (sd, mcsjd with each initialisation, pjd, eagle2, MuLo-SD's lossless variant) against ar in one process: 1000
# images at batch 1 with classifier and Inception features (the quality test), and a speed run at batch 8 (96
# images, classifier features only: exact methods sample the batch-1 distribution at any batch size). Resumable:
# run it again after an interruption (a finished run is not redone). Needs `make fid` once.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench_lib.sh  # bench NAME ARGS...: run once, resume if killed
N=${N_FULL:-1000}
N_B8=${N_B8:-96}
LOSSLESS=(--methods ar,sd,mcsjd,pjd,eagle2 --setting mcsjd:init=spatial --setting mcsjd:init=lowres
          --setting mulo:acceptance=exact)
bench lossless_b1 --preset full "${LOSSLESS[@]}" --num-images "$N" --batch-size 1
bench lossless_b8 "${LOSSLESS[@]}" --num-images "$N_B8" --batch-size 8
.venv/bin/python scripts/bench_tables.py --marker lossless docs/METHODS.md "$O" lossless_b1 "Lossless methods, batch 1" \
  lossless_b8 "Lossless methods, batch 8"
