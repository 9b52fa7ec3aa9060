#!/usr/bin/env bash
# The one prepared run for a session with an accelerator (issue 16): seven stages in order of
# value, each its own process under `timeout`, at most 9 minutes in all. Every result is a JSON
# line appended to $OUT/results.jsonl as soon as it exists (a cut run keeps what it measured),
# and each stage ends with a line {"stage", "status": ok|failed|timeout|skipped, "rc",
# "seconds"}; its stdout and stderr are in $OUT/<stage>.log.
#   1 env       nvidia-smi, jax and jaxlib versions, devices
#   2 smoke     every Pallas kernel (pallas = Triton, mosaic = Hopper), forward and
#               gradients vs the reference at one small bf16 shape (causal, GQA, segment ids);
#               full error text kept
#   3 headline  bf16, head_dim 128, batch 2 x 8k, 16 heads, causal and not, forward and
#               forward+backward of every implementation: TFLOP/s, ratio to cuDNN, error vs the
#               reference; writes $OUT/measured.json (copy it to kernels/flash_attention/ to
#               let implementation="auto" use it)
#   4 tiles     a few tile sizes of the mosaic kernel
#   5 check     the full `bench --check` of every Pallas kernel
#   6 mfu       MFU of the GPT-2-small-sized step with the fastest attention of stage 3
#   7 trace     one short jax.profiler trace of that attention, forward+backward
#
#   OUT=/tmp/out PY=python bash benchmarks/gpu_check.sh            # on the device
#   OUT=/tmp/out bash benchmarks/gpu_check.sh --dry-run            # every stage, tiny, on CPU
# --dry-run runs each stage at tiny sizes on CPU (interpret mode) with the same commands the
# device run uses; tests/kernels/test_dispatch_lowering.py runs it with the modules the device
# image lacks blocked. Exit status: 0 only if every stage that ran succeeded.
set -uo pipefail
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT=${OUT:?set OUT to the output folder}
PY=${PY:-python}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
RESULTS="$OUT/results.jsonl"
START=$SECONDS
TOTAL=${GPU_CHECK_SECONDS:-540}  # 9 minutes
SCALE=1
status=0

if (( DRY )); then
  export JAX_PLATFORMS=cpu
  # Interpret mode on a CPU shared with other work is slower than the device, not faster.
  SCALE=4 TOTAL=$(( TOTAL * 4 ))
fi

# stage NAME BUDGET_SECONDS COMMAND...: run under the smaller of its budget and what is left.
stage() {
  local name=$1 budget=$(( $2 * SCALE )); shift 2
  local left=$(( TOTAL - (SECONDS - START) ))
  (( budget > left )) && budget=$left
  local began=$SECONDS rc state
  if (( budget < 5 )); then
    state=skipped rc=0
    echo "{\"stage\": \"$name\", \"status\": \"skipped\", \"reason\": \"no time left\"}" >> "$RESULTS"
    return
  fi
  echo "== $name (up to ${budget}s)"
  timeout --kill-after=10 "$budget" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  if (( rc == 0 )); then state=ok; elif (( rc == 124 || rc == 137 )); then state=timeout; else state=failed; fi
  (( rc != 0 )) && status=1
  tail -n 3 "$OUT/$name.log"
  echo "{\"stage\": \"$name\", \"status\": \"$state\", \"rc\": $rc, \"seconds\": $(( SECONDS - began ))}" >> "$RESULTS"
}

BENCH=("$PY" -m kernels.flash_attention.bench --jsonl "$RESULTS")
PALLAS_IMPLS=(pallas mosaic)  # this package's kernels (Triton, Hopper Mosaic GPU)

stage env 30 "$PY" -c '
import json, subprocess, sys
row = {"stage": "env", "python": sys.version.split()[0]}
try:
  row["nvidia_smi"] = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
except (OSError, subprocess.SubprocessError) as e:
  row["nvidia_smi"] = f"unavailable: {e}"
import jax, jaxlib
row.update(jax=jax.__version__, jaxlib=jaxlib.__version__, backend=jax.default_backend(),
           devices=[f"{d.platform}:{d.id} {d.device_kind}" for d in jax.devices()],
           compute_capability=getattr(jax.devices()[0], "compute_capability", None))
print(json.dumps(row))
open(sys.argv[1], "a").write(json.dumps(row) + "\n")
' "$RESULTS"

stage smoke 100 "${BENCH[@]}" --stage smoke --check --smoke --impls "${PALLAS_IMPLS[@]}"

HEADLINE=(--dtype bfloat16 --head-dims 128 --seqs 8192 --tokens 16384 --dim 2048
          --causal false true --warmup 2 --repeats 10)
RECORD=(--record --table "$OUT/measured.json")
(( DRY )) && RECORD=()  # measured.json holds device measurements only
stage headline 200 "${BENCH[@]}" --stage headline "${HEADLINE[@]}" --error "${RECORD[@]}" \
    --out "$OUT/headline"

TILES="128x128 128x256 256x128" TILE_DIM=128
(( DRY )) && TILES="128x128" TILE_DIM=64  # the GPU interpreter is slow: the smallest it takes
# A configuration the kernel rejects (shared memory) is a row saying so, not a stage failure;
# in the dry run every row must be timed.
stage tiles 70 bash -c '
  rc=0
  for tile in '"$TILES"'; do
    "$@" --stage tiles --impls mosaic --block-q "${tile%x*}" --block-k "${tile#*x}" \
        --dtype bfloat16 --head-dims '"$TILE_DIM"' --seqs 8192 --tokens 16384 --dim 2048 \
        --causal false true --warmup 2 --repeats 5 --out "'"$OUT"'/tiles/$tile" || rc=1
  done
  (( '"$DRY"' )) && exit $rc || exit 0' tiles "${BENCH[@]}"

stage check 70 "${BENCH[@]}" --stage check --check --impls "${PALLAS_IMPLS[@]}"

# The fastest causal forward+backward of stage 3 (GPT is causal); XLA if none was timed.
BEST=$("$PY" -c '
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
timed = [r for r in rows if r.get("stage") == "headline" and r.get("status") == "ok"
         and r.get("mode") == "fwd+bwd" and r.get("causal")]
print(max(timed, key=lambda r: r["tflops"])["impl"] if timed else "xla")' "$RESULTS" 2>/dev/null || echo xla)
echo "fastest causal attention in the headline: $BEST"

MFU=(--size gpt2-small --batch 16 --steps 20 --dtype bfloat16)
(( DRY )) && MFU=(--size tiny --batch 8 --steps 2 --dtype float32)
stage mfu 60 bash -c '
  "$1" -m benchmarks.mfu "${@:4}" --attention "$2" --out "$3/mfu" || exit $?
  "$1" -c "
import glob, json, sys
for path in sorted(glob.glob(sys.argv[1] + \"/mfu/*.json\")):
  row = dict(stage=\"mfu\", **json.load(open(path)))
  print(json.dumps(row)); open(sys.argv[2], \"a\").write(json.dumps(row) + \"\n\")
" "$3" "$3/results.jsonl"' mfu "$PY" "$BEST" "$OUT" "${MFU[@]}"

stage trace 40 "${BENCH[@]}" --stage trace --impls "$BEST" --dtype bfloat16 --head-dims 128 \
    --seqs 4096 --tokens 8192 --dim 2048 --causal true --warmup 1 --repeats 3 \
    --trace "$OUT/trace" --out "$OUT/trace_bench"

echo "done in $(( SECONDS - START ))s; results in $RESULTS; exit $status"
exit $status
