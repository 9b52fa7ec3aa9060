#!/usr/bin/env bash
# One prepared device run: correctness of the compiled kernels, then the target benchmark
# (bf16, head_dim 128, seq 8k x batch 2 = 16k tokens, causal and not) with a profiler trace.
# Everything lands in $OUT. Needs a Python with jax[cuda] (or TPU) and this repo importable:
#   OUT=/tmp/out PY=.venv/bin/python bash kernels/flash_attention/gpu_check.sh
set -uo pipefail
OUT=${OUT:?set OUT to the output folder}
PY=${PY:-python}
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
mkdir -p "$OUT"

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  "$PY" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
} > "$OUT/env.txt" 2>&1

"$PY" -m kernels.flash_attention.bench --check 2>&1 | tee "$OUT/check.txt"
check_status=${PIPESTATUS[0]}

"$PY" -m kernels.flash_attention.bench --out "$OUT/bench" --dtype bfloat16 --head-dims 128 \
    --seqs 8192 --tokens 16384 --causal false true --trace "$OUT/trace" 2>&1 | tee "$OUT/bench.txt"
bench_status=${PIPESTATUS[0]}

echo "check exit $check_status, bench exit $bench_status"
exit $(( check_status || bench_status ))
