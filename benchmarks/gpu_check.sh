#!/usr/bin/env bash
# One prepared accelerator run for issues 3 and 4: MFU of a GPT-2-small-sized model (bf16,
# each attention implementation), then the flash-attention kernel checks and benchmark.
# Results land in $OUT. Needs a Python with jax for the device and this repo importable:
#   OUT=/tmp/out PY=.venv/bin/python bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:?set OUT to the output folder}
PY=${PY:-python}
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
mkdir -p "$OUT/mfu"

status=0
for attention in cudnn pallas xla; do
  "$PY" -m benchmarks.mfu --size gpt2-small --batch 16 --steps 30 --dtype bfloat16 \
      --attention "$attention" --out "$OUT/mfu/$attention" 2>&1 | tee "$OUT/mfu_$attention.txt"
  status=$(( status || PIPESTATUS[0] ))
done
bash kernels/flash_attention/gpu_check.sh
kernels=$?
echo "mfu exit $status, kernels exit $kernels"
exit $(( status || kernels ))
