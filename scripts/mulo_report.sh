#!/usr/bin/env bash
# The MuLo-SD measurements behind docs/MULOSD.md: `mulosd bench` runs (each one process, settings interleaved,
# each with its own `ar` reference), then scripts/mulo_tables.py copies the tables into the doc. A killed run
# continues where it stopped (--resume); a finished one is not redone.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench_lib.sh  # bench NAME ARGS...: run once, resume if killed
# These runs (2026-11-24 .. 2026-12-05) measured the paper's rule, mulo's default until mulosd's own defaults
# replaced it (scripts/quality_report.sh); it is preset=paper now: add preset=paper to every mulo setting below to
# measure the same method again.
N_MAIN=${N_MAIN:-100}   # images per setting: batch-1 comparison
N_SWEEP=${N_SWEEP:-40}  # images per setting: sweeps and ablations
N_B8=${N_B8:-48}        # images per setting: batch 8

bench main_b1 --methods ar,lantern,sjd,zipar,mulo --sweep mulo.r=2,4 --num-images "$N_MAIN" --batch-size 1
bench sweep_tau_k --methods ar,mulo --sweep mulo.tau=0.02,0.05,0.1,0.2 --sweep mulo.k=1,8,32 --num-images "$N_SWEEP"
bench operating_point --methods ar --setting mulo:tau=0.02,k=8 --setting mulo:tau=0.05,k=32 \
  --setting mulo:tau=0.1,k=32 --num-images 200
# quality probes at N = 200 without an AR row (AR's FID at N = 200 is in operating_point). explore_a was run
# while the down-sampler default was still pixel: its rows=1 row names it explicitly here to reproduce it.
bench explore_a --methods "" --setting mulo:tau=0.3,k=32 --setting mulo:tau=0.5,k=64 \
  --setting mulo:tau=0.1,k=32,resampling=serial --setting mulo:tau=0.1,k=32,rows=1,drafting=serial,downsampler=pixel \
  --num-images 200 --no-warmup
bench explore_b --methods "" --setting mulo:tau=0.1,k=32,candidates=sample --setting mulo:tau=0.3,k=8 \
  --setting mulo:tau=0.2,k=16 --setting mulo:tau=0.1,k=32,rows=1,drafting=serial --num-images 200 --no-warmup
bench sweep_radius --methods ar,mulo --sweep mulo.radius=0,1,2,3,inf --num-images "$N_SWEEP"
bench ablations --methods ar,mulo --setting mulo:rejection=raster --setting mulo:rejection=naive_local \
  --setting mulo:upsampler=pixel --setting mulo:downsampler=learned --setting mulo:resampling=serial \
  --setting mulo:island_window=1 --setting mulo:candidates=sample --setting mulo:drafting=serial,rows=1 \
  --setting mulo:drafting=serial,rows=1,downsampler=pixel --setting mulo:rows=2 \
  --setting mulo:acceptance=exact --setting mulo:r=4,acceptance=exact --num-images "$N_SWEEP"
bench downsampler_padded --methods ar --setting mulo:drafting=serial,rows=1,downsampler=pixel \
  --setting mulo:drafting=serial,rows=1,downsampler=learned --num-images 200
bench main_b8 --methods ar,lantern,zipar,mulo --sweep mulo.r=2,4 --num-images "$N_B8" --batch-size 8
[ -f "$O/upsamplers.json" ] || .venv/bin/python scripts/eval_upsamplers.py "$O/upsamplers.json"
.venv/bin/python scripts/mulo_tables.py "$O"
