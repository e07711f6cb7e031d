#!/usr/bin/env bash
# The full `mulosd bench` run behind docs/RESULTS.md: every method, 1000 images each at batch 1 and at batch 8,
# classifier and Inception FID. Hours on 2 cores: each run checkpoints after every round and this script resumes
# a killed one (run it again); a finished run is not redone. Needs `make fid` once.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench_lib.sh  # bench NAME ARGS...: run once, resume if killed
N=${N_FULL:-1000}

bench full_b1 --preset full --num-images "$N" --batch-size 1
bench full_b8 --preset full --num-images "$N" --batch-size 8
.venv/bin/python scripts/bench_tables.py docs/RESULTS.md "$O" full_b1 "Batch 1" full_b8 "Batch 8"
