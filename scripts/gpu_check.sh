#!/usr/bin/env bash
# The GPU check: mulosd from this source tree on a CUDA machine, with that machine's own python3 (a CUDA torch >= 2.11
# and the common packages; nothing is installed). Every step has a time limit (7 minutes in all at most); a bench
# that hits its limit keeps the rounds it finished (results are rewritten after every round).
#   1. the CUDA-marked tests (pytest -m cuda),
#   2. a short bench of every method on fmnist-32: batch 1 and batch 16, float32 and bfloat16,
#   3. mulosd profile at LlamaGen GPT-B and GPT-L sizes (random weights, 256 px) in bfloat16 and GPT-B in float32,
#   4. scripts/precision_check.py: how often bfloat16 flips greedy verification against greedy AR.
# Every step writes OUTDIR/<step>.log and its own outputs; OUTDIR/summary.txt lists each step's exit code and time.
#
#   scripts/gpu_check.sh --prepare          # here, once: Fashion-MNIST's test split into .data/ (git-ignored), which
#                                           # the bench's reference statistics need; name .data in the device's carry
#   scripts/gpu_check.sh OUTDIR             # on the GPU machine, from the repository root
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 scripts/gpu_check.sh OUTDIR   # a rehearsal on a machine without a GPU
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  src=${MULOSD_DATA:-/usr/share/datasets/fashion-mnist}
  mkdir -p .data/fashion-mnist && cp "$src"/t10k-*-idx*-ubyte.gz .data/fashion-mnist/ || exit 1
  # the real-data floor of FID at n images reads the first n training images: the first 1000 travel (0.2 MB, not 26)
  "${PYTHON:-python3}" - "$src" .data/fashion-mnist 1000 <<'PYEOF' || exit 1
import gzip, struct, sys
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for name, item in (("train-images-idx3-ubyte.gz", 784), ("train-labels-idx1-ubyte.gz", 1)):
    data = gzip.open(f"{src}/{name}").read()
    dims = data[3]
    shape = list(struct.unpack(f">{dims}I", data[4:4 + 4 * dims]))
    body = data[4 + 4 * dims:4 + 4 * dims + n * item]
    shape[0] = n
    with gzip.open(f"{dst}/{name}", "wb") as f:
        f.write(data[:4] + struct.pack(f">{dims}I", *shape) + body)
PYEOF
  grep -qx '/.data/' .git/info/exclude 2>/dev/null || echo '/.data/' >> .git/info/exclude
  du -sh .data && exit 0
fi

OUT=${1:?usage: scripts/gpu_check.sh OUTDIR   (or --prepare)}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
QUICK=${GPU_CHECK_QUICK:-0}
PY=${PYTHON:-python3}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MULOSD_DATA=${MULOSD_DATA:-$PWD/.data/fashion-mnist} MULOSD_CACHE="$OUT/cache"
M=("$PY" -m mulosd)
if [ "$QUICK" = 1 ]; then B1=2; B16=16; SIZES="GPT-B"; KS=1,4,16; BS=1,4; else B1=10; B16=32; SIZES="GPT-B GPT-L"; KS=1,2,4,8,16,32,64,128,256; BS=1,4,16; fi
: > "$OUT/summary.txt"

step() {  # step NAME LIMIT_S COMMAND...: run it with a time limit, log it, and note exit code and seconds
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name: $*" | tee -a "$OUT/summary.txt"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}

step env 30 bash -c "nvidia-smi 2>&1 | head -20; $PY -c 'import torch, sys; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no CUDA\")'; $PY -c 'import click, safetensors, tqdm, PIL, matplotlib, numpy, scipy, pytest; print(\"packages: ok\")'"
step pytest_cuda 60 "$PY" -m pytest -m cuda -p no:cacheprovider -rs tests/test_precision.py tests/test_training.py tests/test_llamagen_import.py
for dtype in float32 bfloat16; do
  step "bench_b1_$dtype" 55 "${M[@]}" bench --num-images "$B1" --batch-size 1 --device "$DEVICE" --dtype "$dtype" \
    --out "$OUT/bench_b1_$dtype" --force --no-progress
  step "bench_b16_$dtype" 40 "${M[@]}" bench --num-images "$B16" --batch-size 16 --device "$DEVICE" --dtype "$dtype" \
    --out "$OUT/bench_b16_$dtype" --force --no-progress
done
for size in $SIZES; do
  step "profile_${size}_bfloat16" 30 "${M[@]}" profile --size "$size" --image-size 256 --batch-sizes "$BS" \
    --new-tokens "$KS" --repeats 10 --device "$DEVICE" --dtype bfloat16 --out "$OUT/profile_${size}_bfloat16"
done
step profile_GPT-B_float32 30 "${M[@]}" profile --size GPT-B --image-size 256 --batch-sizes "$BS" --new-tokens "$KS" \
  --repeats 10 --device "$DEVICE" --dtype float32 --out "$OUT/profile_GPT-B_float32"
step precision 40 "$PY" scripts/precision_check.py --num-images 10 --batch-size 10 --device "$DEVICE" --out "$OUT/precision.json"
echo "total $SECONDS s" | tee -a "$OUT/summary.txt"
