"""Benchmark and on-device check of flash attention: `python -m kernels.flash_attention.bench`.

Times forward and forward+backward of every available implementation (pallas, xla,
cudnn on GPU, tokamax if installed) over sequence lengths, head dims and causal or
not, at a fixed number of tokens per batch, and writes a Markdown table, JSON and a
PNG plot. TFLOP/s use the FlashAttention count: forward 4·B·H·S²·D (half when
causal), backward 2.5× forward. `--check` instead compares the compiled Pallas
kernels with the reference on this device. Either exits 1 if a case fails (a benchmark row
that is neither timed nor out of memory; a check that errs or misses its tolerance). On CPU everything runs tiny, in
interpret mode: that shows the harness works and says nothing about speed.

`--jsonl FILE` appends every row to FILE as it is measured (a cut run keeps what it measured);
`--error` adds each row's max error against the float32 reference (forward: the output;
forward+backward: the worst of dq, dk, dv), relative to the reference's largest magnitude;
`--segments` benchmarks packed sequences (three documents per row, as segment ids);
`--record` (GPU/TPU only) writes the run's forward+backward TFLOP/s into `measured.json`, the
table `implementation="auto"` consults (see dispatch.py). Rows carry `vs_cudnn`, the ratio to
cuDNN's TFLOP/s in the same case, when cuDNN ran (it is timed first).

Imports only jax, numpy and matplotlib (for the plot) besides this package, so it runs on a
bare accelerator image (tests/kernels/test_dispatch_lowering.py checks that in a subprocess).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kernels.flash_attention import api, dispatch, reference

# Dense bf16 peak TFLOP/s from vendor spec sheets; first substring of device_kind that matches.
PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("v6 lite", 918.0),
               ("v6e", 918.0), ("v5 lite", 197.0), ("v5e", 197.0), ("v5p", 459.0),
               ("v5", 459.0), ("v4", 275.0))
BACKWARD_FLOPS_FACTOR = 2.5


def peak_tflops(device_kind: str) -> float | None:
  return next((peak for name, peak in PEAK_TFLOPS if name in device_kind), None)


def attention_flops(batch, heads, seq, head_dim, causal, mode):
  forward = 4 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)
  return forward if mode == "fwd" else forward * (1 + BACKWARD_FLOPS_FACTOR)


def available_implementations():
  """Every implementation api has that this backend runs (cuDNN first: the others' ratios
  are to it); cuDNN and "mosaic" (Hopper) only on GPU."""
  impls = (["cudnn", "mosaic", "pallas", "xla"] if jax.default_backend() == "gpu"
           else ["pallas", "xla"])
  try:
    import tokamax  # noqa: F401  (optional)
    impls.append("tokamax")
  except ImportError:
    pass
  return impls


def attention_fn(impl, causal, blocks, segment_ids=None):
  if impl == "tokamax":
    if segment_ids is not None:
      raise ValueError("the tokamax row takes no segment ids here")
    import tokamax
    return lambda q, k, v: tokamax.dot_product_attention(q, k, v, is_causal=causal)
  return lambda q, k, v: api.flash_attention(q, k, v, causal=causal, segment_ids=segment_ids,
                                             implementation=impl, **blocks)


def blocks_for(args, impl) -> dict:
  """Tile sizes for `impl`: those given on the command line, else tiny mode's 16 x 16 for the
  Triton-path kernel only (the mosaic kernel has its own minimum tiles)."""
  return args.blocks if args.blocks_given or impl == "pallas" else {}


def packed_segment_ids(batch, seq):
  """Three documents per row, as packed pretraining batches have them."""
  return jnp.broadcast_to(jnp.arange(seq) * 3 // seq, (batch, seq)).astype(jnp.int32)


def relative_error(actual, expected) -> float:
  """max |actual - expected| / max |expected|, in float32."""
  expected = expected.astype(jnp.float32)
  return float(jnp.max(jnp.abs(actual.astype(jnp.float32) - expected))
               / jnp.maximum(jnp.max(jnp.abs(expected)), 1e-30))


def step_fn(fn, mode):
  if mode == "fwd":
    return jax.jit(fn)
  return jax.jit(lambda q, k, v, do: jax.vjp(fn, q, k, v)[1](do))


def median_seconds(compiled, inputs, warmup, repeats):
  for _ in range(warmup):
    jax.block_until_ready(compiled(*inputs))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*inputs))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _failure(error: Exception) -> str:
  text = str(error)
  if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
    return "OOM"
  return f"failed: {type(error).__name__}: {text.strip().splitlines()[0][:160] if text.strip() else ''}"


def run_case(impl, mode, seq, head_dim, causal, args, key, references=None):
  heads = args.dim // head_dim
  batch = max(1, args.tokens // seq)
  row = dict(impl=impl, mode=mode, seq=seq, head_dim=head_dim, causal=causal,
             masked=args.segments, batch=batch, heads=heads, dtype=args.dtype,
             **blocks_for(args, impl))
  shape = (batch, seq, heads, head_dim)
  segment_ids = packed_segment_ids(batch, seq) if args.segments else None
  try:
    inputs = [jax.random.normal(k, shape, args.dtype) for k in jax.random.split(key, 4)]
    inputs = inputs[:3] if mode == "fwd" else inputs
    fn = attention_fn(impl, causal, blocks_for(args, impl), segment_ids)
    compiled = step_fn(fn, mode).lower(*inputs).compile()
    seconds = median_seconds(compiled, inputs, args.warmup, args.repeats)
    memory = compiled.memory_analysis()
    if references is not None:
      ref_key = (mode, seq, head_dim, causal)
      if ref_key not in references:
        ref = lambda q, k, v: reference.attention(q, k, v, causal=causal,
                                                  segment_ids=segment_ids)[0]
        upcast = [x.astype(jnp.float32) for x in inputs]
        references[ref_key] = jax.device_get(step_fn(ref, mode)(*upcast))
      expected = references[ref_key]
      got = compiled(*inputs)
      pairs = [(got, expected)] if mode == "fwd" else list(zip(got, expected))
      row["error"] = max(relative_error(a, jnp.asarray(b)) for a, b in pairs)
      del got
  # A row per failure (unsupported shape, OOM, compile error) instead of a crash.
  except Exception as error:  # noqa: BLE001
    row["status"] = _failure(error)
    return row
  tflops = attention_flops(batch, heads, seq, head_dim, causal, mode) / seconds / 1e12
  peak = peak_tflops(jax.devices()[0].device_kind)
  row.update(status="ok", ms=seconds * 1e3, tflops=tflops,
             pct_peak=None if peak is None else 100 * tflops / peak)
  if memory is not None:  # what the executable allocates: arguments, outputs, temporaries
    row["memory_bytes"] = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                           + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  stats = jax.devices()[0].memory_stats() or {}
  row["device_peak_bytes"] = stats.get("peak_bytes_in_use")  # process high-water mark
  return row


def _fmt(value, spec):
  return "" if value is None else format(value, spec)


def markdown(rows, header):
  lines = [header, "",
           "| impl | mode | causal | D | seq | batch | ms | TFLOP/s | % peak | mem GiB | status |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    mem = r.get("memory_bytes")
    lines.append(
        f"| {r['impl']} | {r['mode']} | {r['causal']} | {r['head_dim']} | {r['seq']} | "
        f"{r['batch']} | {_fmt(r.get('ms'), '.4g')} | {_fmt(r.get('tflops'), '.4g')} | "
        f"{_fmt(r.get('pct_peak'), '.1f')} | {_fmt(None if mem is None else mem / 2**30, '.3g')} | "
        f"{r['status']} |")
  return "\n".join(lines) + "\n"


def plot(rows, path, title):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  modes = ("fwd", "fwd+bwd")
  causals = sorted({r["causal"] for r in rows})
  fig, axes = plt.subplots(len(modes), len(causals), figsize=(max(8, 5.5 * len(causals)), 8),
                           sharex=True, squeeze=False)
  for (mode, causal), ax in zip([(m, c) for m in modes for c in causals], axes.flat):
    ax.set_title(f"{mode}, {'causal' if causal else 'full'}")
    for impl, head_dim in sorted({(r["impl"], r["head_dim"]) for r in rows}):
      points = [(r["seq"], r["tflops"]) for r in rows if r["status"] == "ok"
                and (r["impl"], r["head_dim"], r["mode"], r["causal"]) == (impl, head_dim, mode, causal)]
      if points:
        ax.plot(*zip(*points), marker="o", label=f"{impl} D={head_dim}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("TFLOP/s")
    if ax.lines:
      ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def benchmark(args):
  device = jax.devices()[0]
  key = jax.random.key(0)
  rows = []
  trace = jax.profiler.trace(args.trace) if args.trace else contextlib.nullcontext()
  with trace:
    for head_dim in args.head_dims:
      for causal in args.causal:
        for seq in args.seqs:
          references = {} if args.error else None
          cudnn = {}
          for impl in args.impls:
            for mode in ("fwd", "fwd+bwd"):
              row = run_case(impl, mode, seq, head_dim, causal, args, key, references)
              if impl == "cudnn" and row["status"] == "ok":
                cudnn[mode] = row["tflops"]
              if row["status"] == "ok" and mode in cudnn:
                row["vs_cudnn"] = row["tflops"] / cudnn[mode]
              row.update(device=device.device_kind, jax=jax.__version__)
              print(json.dumps(row), flush=True)
              if args.jsonl:
                with open(args.jsonl, "a") as f:
                  f.write(json.dumps(dict(stage=args.stage, **row)) + "\n")
              rows.append(row)
  slug = device.device_kind.lower().replace(" ", "-")
  title = (f"flash attention on {device.device_kind}, jax {jax.__version__}, {args.dtype}, "
           f"{args.tokens} tokens per batch, model dim {args.dim}")
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / f"{slug}.md").write_text(markdown(rows, f"# {title}"))
  (args.out / f"{slug}.json").write_text(json.dumps(
      dict(device=device.device_kind, jax=jax.__version__, rows=rows), indent=1))
  plot(rows, args.out / f"{slug}.png", title)
  print(f"wrote {args.out}/{slug}.{{md,json,png}}")
  if args.record:
    written = dispatch.record(rows, device.device_kind, jax.__version__,
                              "python -m kernels.flash_attention.bench " + " ".join(args.argv),
                              args.table)
    print(f"recorded {len(written)} rows in {args.table}")
  # OOM is a measurement (the size does not fit); any other failure is a broken case.
  failed = [r for r in rows if r["status"] not in ("ok", "OOM")]
  if failed:
    print(f"{len(failed)} of {len(rows)} cases failed", flush=True)
  return 1 if failed else 0


def check(args):
  """Compiled Pallas kernels (every one of `--impls` that is this package's: pallas, mosaic)
  vs the reference, forward and all grads, at a few shapes; exit 1 on any failure. `--smoke`:
  one small bf16 shape (causal, GQA, segment ids) per kernel, full error text kept."""
  tolerance = {"bfloat16": 3e-2, "float16": 5e-3, "float32": 1e-4}
  # (batch, seq_q, seq_k, heads, kv_heads, head_dim, causal, with segment ids)
  if args.smoke:
    # head_dim 64: the smallest the mosaic kernel takes.
    cases = [(1, 40, 40, 4, 2, 64, True, True)] if args.tiny else [(2, 512, 512, 8, 2, 128,
                                                                     True, True)]
  elif args.tiny:
    cases = [(1, 40, 40, 2, 1, 64, True, True), (1, 24, 56, 2, 2, 64, False, False)]
  else:
    cases = [(2, 1024, 1024, 8, 8, 128, True, False), (2, 1000, 1000, 8, 2, 64, False, True),
             (1, 512, 1536, 4, 1, 128, False, False), (1, 2048, 2048, 4, 4, 128, True, True)]
  impls = [impl for impl in args.impls if impl in dispatch.PALLAS_FAMILY]
  failures = total = 0
  key = jax.random.key(1)
  for impl in impls:
    # The Hopper kernel takes bf16 and fp16 only: its second dtype is fp16, not float32.
    dtypes = ("bfloat16",) if args.smoke else (
        "bfloat16", "float16" if impl == "mosaic" else "float32")
    for dtype in dtypes:
      for case in cases:
        batch, seq_q, seq_k, heads, kv_heads, head_dim, causal, with_segments = case
        kq, kk, kv, kd = jax.random.split(jax.random.fold_in(key, seq_q * seq_k), 4)
        q = jax.random.normal(kq, (batch, seq_q, heads, head_dim), dtype)
        k, v = (jax.random.normal(x, (batch, seq_k, kv_heads, head_dim), dtype)
                for x in (kk, kv))
        do = jax.random.normal(kd, q.shape, dtype)
        segment_ids = packed_segment_ids(batch, seq_q) if with_segments else None
        common = dict(causal=causal, segment_ids=segment_ids)
        fn = jax.jit(lambda q, k, v, do: jax.vjp(
            lambda *a: api.flash_attention(*a, implementation=impl, **blocks_for(args, impl),
                                         **common),
            q, k, v))
        ref = jax.jit(lambda q, k, v: jax.vjp(lambda *a: reference.attention(*a, **common)[0],
                                              q, k, v))
        name = f"{impl} {dtype} B={batch} T={seq_q} S={seq_k} H={heads} K={kv_heads} " \
               f"D={head_dim} causal={causal} segments={with_segments}"
        row = dict(impl=impl, dtype=dtype, batch=batch, seq_q=seq_q, seq_k=seq_k, heads=heads,
                   kv_heads=kv_heads, head_dim=head_dim, causal=causal, masked=with_segments,
                   tolerance=tolerance[dtype], **blocks_for(args, impl))
        try:
          out, vjp = fn(q, k, v, do)
          expected, ref_vjp = ref(*(x.astype(jnp.float32) for x in (q, k, v)))
          pairs = [("out", out, expected),
                   *zip(("dq", "dk", "dv"), vjp(do), ref_vjp(do.astype(jnp.float32)))]
          errors = {n: relative_error(a, b) for n, a, b in pairs}
          ok = all(np.isfinite(e) and e <= tolerance[dtype] for e in errors.values())
          detail = " ".join(f"{n}={e:.1e}" for n, e in errors.items())
          row.update(errors=errors)
        except Exception as error:  # noqa: BLE001  (report every case, then fail)
          ok, detail = False, _failure(error)
          row.update(error_text=traceback.format_exc())
        failures += not ok
        total += 1
        row.update(status="ok" if ok else "FAIL", device=jax.devices()[0].device_kind,
                   jax=jax.__version__)
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
        if args.jsonl:
          with open(args.jsonl, "a") as f:
            f.write(json.dumps(dict(stage=args.stage, **row)) + "\n")
  print(f"{failures} of {total} checks failed" if failures else f"all {total} checks passed")
  return 1 if failures or not total else 0


def _bool(text):
  if text.lower() not in ("true", "false"):
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
  return text.lower() == "true"


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/"
                      "flash_attention on GPU/TPU, a temporary folder on CPU)")
  parser.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
  parser.add_argument("--head-dims", type=int, nargs="+",
                      help="default: 64 128 (32 with --tiny; given ones are kept)")
  parser.add_argument("--causal", type=_bool, nargs="+", default=[False, True],
                      metavar="{true,false}")
  parser.add_argument("--impls", nargs="+", default=None, help="default: all available")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--tokens", type=int, default=16384, help="batch = tokens // seq")
  parser.add_argument("--dim", type=int, default=2048, help="heads = dim // head_dim")
  parser.add_argument("--block-q", type=int)
  parser.add_argument("--block-k", type=int)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--trace", type=Path, help="write a jax.profiler trace here")
  parser.add_argument("--tiny", action="store_true", help="tiny sizes (forced on CPU)")
  parser.add_argument("--check", action="store_true", help="check correctness, don't time")
  parser.add_argument("--smoke", action="store_true",
                      help="with --check: one small bf16 shape per kernel")
  parser.add_argument("--segments", action="store_true",
                      help="packed sequences: three documents per row as segment ids")
  parser.add_argument("--error", action="store_true",
                      help="each row's max error against the float32 reference")
  parser.add_argument("--jsonl", type=Path, help="append each row to this JSON-lines file")
  parser.add_argument("--stage", default="bench", help="the `stage` field of --jsonl rows")
  parser.add_argument("--record", action="store_true",
                      help="write forward+backward TFLOP/s into --table (GPU/TPU only)")
  parser.add_argument("--table", type=Path, default=dispatch.TABLE,
                      help="the measured table --record writes (default: the one auto reads)")
  args = parser.parse_args(argv)
  args.argv = list(argv)
  on_cpu = jax.default_backend() == "cpu"
  if args.record and on_cpu:
    raise SystemExit("--record writes kernels/flash_attention/measured.json, which holds "
                     "measurements only from a GPU or TPU; this backend is cpu")
  args.tiny = args.tiny or on_cpu
  args.blocks_given = bool(args.block_q or args.block_k)
  if args.tiny:
    args.seqs, args.head_dims, args.causal = [64], args.head_dims or [32], [True]
    args.tokens, args.warmup, args.repeats = 128, 1, 2
    args.dim = 2 * max(args.head_dims)  # two heads
    args.block_q = args.block_q or 16
    args.block_k = args.block_k or 16
  args.head_dims = args.head_dims or [64, 128]
  args.blocks = {name: value for name, value in
                 (("block_q", args.block_q), ("block_k", args.block_k)) if value}
  args.impls = args.impls or available_implementations()
  if args.out is None:
    args.out = (Path(tempfile.mkdtemp(prefix="flash_attention_bench_")) if on_cpu
                else Path("benchmarks/results/flash_attention"))
  return args


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.check:
    return check(args)
  return benchmark(args)


if __name__ == "__main__":
  sys.exit(main())
