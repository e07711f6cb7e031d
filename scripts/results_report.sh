#!/usr/bin/env bash
# The full `mulosd bench` run behind docs/RESULTS.md: every method, 1000 images each at batch 1 and at batch 8,
# classifier and Inception FID. Hours on 2 cores: each run checkpoints after every round and this script resumes
# a killed one (run it again); a finished run is not redone. Needs `make fid` once.
set -euo pipefail
cd "$(dirname "$0")/.."
M=${MULOSD_BIN:-.venv/bin/mulosd}
O=${OUT:-docs/bench}
N=${N_FULL:-1000}

bench() {  # bench NAME ARGS...
  local name=$1; shift
  if [ -f "$O/$name/results.json" ] && grep -q '"complete": true' "$O/$name/results.json"; then echo "== $name: done"; return; fi
  local resume=(); [ -f "$O/$name/state.json" ] && resume=(--resume)
  echo "== $name: $M bench $* --out $O/$name ${resume[*]}"
  $M bench "$@" --out "$O/$name" "${resume[@]}" --no-progress > /dev/null
}

bench full_b1 --preset full --num-images "$N" --batch-size 1
bench full_b8 --preset full --num-images "$N" --batch-size 8
.venv/bin/python scripts/bench_tables.py docs/RESULTS.md "$O" full_b1 "Batch 1" full_b8 "Batch 8"
