#!/usr/bin/env bash
# The MuLo-SD quality runs behind docs/MULOSD.md ("Where the quality goes") and docs/RESULTS.md (issue 19): the
# levers one by one against the paper's rule at N = 200 with Inception features, then MuLo-SD's new default (ours)
# and the paper's rule side by side with AR and the lossy peers at batch 8 (400 images in rounds of 40, so that
# continuous batching refills its 8 slots; classifier features only: every method here gives each image its
# batch-1 tokens, so batch 1 measures the quality) and at batch 1 (1000 images, Inception on). Resumable: run it
# again after an interruption (a finished run is not redone). Needs `make fid` once.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench_lib.sh  # bench NAME ARGS...: run once, resume if killed
N=${N_FULL:-1000}
N_LEVERS=${N_LEVERS:-200}
N_B8=${N_B8:-400}
bench quality_levers --methods ar,mulo --setting mulo:preset=paper --setting mulo:reverify=1 \
  --setting mulo:reverify=3 --setting mulo:preset=paper,reverify=1 --setting mulo:acceptance=soft \
  --setting mulo:tau_peaked=0.5 --setting mulo:radius=0 --num-images "$N_LEVERS" --batch-size 1 --inception
bench quality_b8 --methods ar,lantern,zipar,mulo --setting mulo:r=4 --setting mulo:batching=static \
  --setting mulo:preset=paper,batching=static --setting mulo:preset=paper,r=4,batching=static \
  --num-images "$N_B8" --batch-size 8 --round-images 40
bench quality_b1 --preset full --methods ar,lantern,zipar,mulo --setting mulo:r=4 --setting mulo:preset=paper \
  --setting mulo:preset=paper,r=4 --num-images "$N" --batch-size 1
.venv/bin/python scripts/bench_tables.py --marker levers docs/MULOSD.md "$O" quality_levers \
  "The levers one by one (r = 2, batch 1, N = 200, Inception on)"
.venv/bin/python scripts/bench_tables.py --marker mulo_quality docs/RESULTS.md "$O" quality_b1 \
  "MuLo-SD ours and the paper's rule, batch 1" quality_b8 "MuLo-SD ours and the paper's rule, batch 8"
.venv/bin/python scripts/measured.py
