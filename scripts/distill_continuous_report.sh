#!/usr/bin/env bash
# Issue 20, continuous half: CSpD's drafter distilled from the shipped continuous target on 2 CPU cores
# (resumable: run it again after an interruption), then `cspd` with the shipped and the distilled drafter, each with
# and without trajectory alignment, against `car` in one process (a scratch copy of the set holds the distilled
# drafter as continuous role "distilled").
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/train_lib.sh   # stage NAME ARGS...: train once, resume if killed ($R: runs/)
. scripts/bench_lib.sh   # bench NAME ARGS...: run once, resume if killed ($O: docs/bench)
N=${N_CONT:-200}
CHAIN=${CHAIN:-teacher}   # --chain of the distillation (teacher or aligned)
SET=${CSET:-$R/fmnist-32-cdistilled-$CHAIN}

stage distill_cont_small_$CHAIN distill --model fmnist-32 --continuous --drafter small --samples "${CSAMPLES:-2000}" \
  --positions 32 --chain "$CHAIN" --steps "${CSTEPS:-1000}" --batch-size 16 --lr 1e-3 --warmup 50 \
  --checkpoint-every 100
[ -f "$SET/manifest.json" ] || $M pack --from fmnist-32 --out "$SET" --dtype fp16 \
  --continuous-drafter distilled=$R/distill_cont_small_$CHAIN/model
bench cdistill_${CHAIN}_b1 --model "$SET" --methods car,cspd --setting cspd:align=false --setting cspd:drafter=distilled \
  --setting cspd:drafter=distilled,align=false --num-images "$N" --batch-size 1
