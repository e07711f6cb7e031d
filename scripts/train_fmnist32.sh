#!/usr/bin/env bash
# Train every model of the shipped fmnist-32 set, in order, on 2 CPU cores. Re-running resumes: a stage whose
# summary.json exists is skipped, a stage with a checkpoint continues from it (so a killed session loses at most
# --checkpoint-every steps). Then pack the set (fp16) into src/mulosd/zoo/fmnist-32.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/train_lib.sh  # stage NAME ARGS...: train once, resume if killed

stage tokenizer tokenizer --channels 32 --z-channels 32 --codebook-size 512 --codebook-dim 8 \
  --steps 900 --batch-size 64 --lr 2e-3 --warmup 50 --checkpoint-every 100
stage classifier classifier --width 32 --features 128 --steps 1500 --batch-size 64 --lr 2e-3 --warmup 100
TOK=$R/tokenizer/model
stage target ar --tokenizer $TOK --grid 16 --layers 8 --dim 192 --heads 6 --bf16 \
  --steps 1400 --batch-size 32 --lr 1.5e-3 --warmup 100 --checkpoint-every 100
stage drafter_r2 ar --tokenizer $TOK --grid 8 --layers 8 --dim 192 --heads 6 --bf16 \
  --steps 1100 --batch-size 64 --lr 1.5e-3 --warmup 100 --checkpoint-every 100
stage drafter_r4 ar --tokenizer $TOK --grid 4 --layers 8 --dim 192 --heads 6 --bf16 \
  --steps 800 --batch-size 64 --lr 1.5e-3 --warmup 100 --checkpoint-every 100
stage drafter_small ar --tokenizer $TOK --grid 16 --layers 2 --dim 96 --heads 3 \
  --steps 1500 --batch-size 64 --lr 2e-3 --warmup 100 --checkpoint-every 100
stage upsampler_r2 upsampler --tokenizer $TOK --r 2 --dim 64 --blocks 4 \
  --steps 2600 --ce-steps 2000 --batch-size 64 --lr 1e-3 --warmup 100 --checkpoint-every 200
stage upsampler_r4 upsampler --tokenizer $TOK --r 4 --dim 64 --blocks 4 \
  --steps 2600 --ce-steps 2000 --batch-size 64 --lr 1e-3 --warmup 100 --checkpoint-every 200

$M pack --out src/mulosd/zoo/fmnist-32 --name fmnist-32 --dtype fp16 --tokenizer $TOK --target $R/target/model \
  --classifier $R/classifier/model --drafter r2=$R/drafter_r2/model --drafter r4=$R/drafter_r4/model \
  --drafter small=$R/drafter_small/model --upsampler $R/upsampler_r2/model --upsampler $R/upsampler_r4/model
