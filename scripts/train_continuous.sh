#!/usr/bin/env bash
# Train the continuous-token family of fmnist-32 (issue 6: car / cspd) on 2 CPU cores, then add it to the shipped
# set with `mulosd pack --from`. Re-running resumes like scripts/train_fmnist32.sh: a finished stage is skipped, a
# killed one continues from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
ZOO=${ZOO:-src/mulosd/zoo/fmnist-32}

. scripts/train_lib.sh  # stage NAME ARGS...: train once, resume if killed

stage ctokenizer kl-tokenizer --channels 32 --z-channels 32 --token-dim 4 --kl-weight 1e-4 \
  --steps 1200 --batch-size 64 --lr 2e-3 --warmup 50 --checkpoint-every 100
CTOK=$R/ctokenizer/model
stage ctarget car --tokenizer $CTOK --dim 128 --layers 8 --heads 4 --head-width 128 --head-depth 3 \
  --sample-steps 10 --head-batch-mul 2 --bf16 --steps 1200 --batch-size 32 --lr 1.5e-3 --warmup 100 --checkpoint-every 100
stage cdrafter_small car --tokenizer $CTOK --dim 64 --layers 2 --heads 2 --head-width 64 --head-depth 1 \
  --sample-steps 10 --head-batch-mul 2 --steps 1500 --batch-size 64 --lr 2e-3 --warmup 100 --checkpoint-every 100

$M pack --from "$ZOO" --out "$ZOO" --dtype fp16 --continuous-tokenizer $CTOK --continuous-target $R/ctarget/model \
  --continuous-drafter small=$R/cdrafter_small/model
