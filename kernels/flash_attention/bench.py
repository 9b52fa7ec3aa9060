"""Benchmark and on-device check of flash attention: `python -m kernels.flash_attention.bench`.

Times forward and forward+backward of every available implementation (pallas, xla,
cudnn on GPU, tokamax if installed) over sequence lengths, head dims and causal or
not, at a fixed number of tokens per batch, and writes a Markdown table, JSON and a
PNG plot. TFLOP/s use the FlashAttention count: forward 4·B·H·S²·D (half when
causal), backward 2.5× forward. `--check` instead compares the compiled Pallas
kernels with the reference on this device. Either exits 1 if a case fails (a benchmark row
that is neither timed nor out of memory; a check that errs or misses its tolerance). On CPU everything runs tiny, in
interpret mode: that shows the harness works and says nothing about speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kernels.flash_attention import api, reference

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
  impls = ["pallas", "xla"]
  if jax.default_backend() == "gpu":
    impls.append("cudnn")
  try:
    import tokamax  # noqa: F401  (optional)
    impls.append("tokamax")
  except ImportError:
    pass
  return impls


def attention_fn(impl, causal, blocks):
  if impl == "tokamax":
    import tokamax
    return lambda q, k, v: tokamax.dot_product_attention(q, k, v, is_causal=causal)
  return lambda q, k, v: api.flash_attention(q, k, v, causal=causal, implementation=impl,
                                             **blocks)


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


def run_case(impl, mode, seq, head_dim, causal, args, key):
  heads = args.dim // head_dim
  batch = max(1, args.tokens // seq)
  row = dict(impl=impl, mode=mode, seq=seq, head_dim=head_dim, causal=causal, batch=batch,
             heads=heads, dtype=args.dtype)
  shape = (batch, seq, heads, head_dim)
  try:
    inputs = [jax.random.normal(k, shape, args.dtype) for k in jax.random.split(key, 4)]
    inputs = inputs[:3] if mode == "fwd" else inputs
    compiled = step_fn(attention_fn(impl, causal, args.blocks), mode).lower(*inputs).compile()
    seconds = median_seconds(compiled, inputs, args.warmup, args.repeats)
    memory = compiled.memory_analysis()
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
          for impl in args.impls:
            for mode in ("fwd", "fwd+bwd"):
              row = run_case(impl, mode, seq, head_dim, causal, args, key)
              print(json.dumps(row), flush=True)
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
  # OOM is a measurement (the size does not fit); any other failure is a broken case.
  failed = [r for r in rows if r["status"] not in ("ok", "OOM")]
  if failed:
    print(f"{len(failed)} of {len(rows)} cases failed", flush=True)
  return 1 if failed else 0


def check(args):
  """Compiled Pallas vs the reference (fwd and all grads) at a few shapes; exit 1 on failure."""
  tolerance = {"bfloat16": 3e-2, "float32": 1e-4}
  tiny = args.tiny
  # (batch, seq_q, seq_k, heads, kv_heads, head_dim, causal, with segment ids)
  cases = ([(1, 40, 40, 2, 1, 32, True, True), (1, 24, 56, 2, 2, 32, False, False)] if tiny else
           [(2, 1024, 1024, 8, 8, 128, True, False), (2, 1000, 1000, 8, 2, 64, False, True),
            (1, 512, 1536, 4, 1, 128, False, False), (1, 2048, 2048, 4, 4, 128, True, True)])
  failures = 0
  key = jax.random.key(1)
  for dtype in ("bfloat16", "float32"):
    for batch, seq_q, seq_k, heads, kv_heads, head_dim, causal, with_segments in cases:
      kq, kk, kv, kd = jax.random.split(jax.random.fold_in(key, seq_q * seq_k), 4)
      q = jax.random.normal(kq, (batch, seq_q, heads, head_dim), dtype)
      k, v = (jax.random.normal(x, (batch, seq_k, kv_heads, head_dim), dtype) for x in (kk, kv))
      do = jax.random.normal(kd, q.shape, dtype)
      segment_ids = None
      if with_segments:  # three packed documents per row
        segment_ids = jnp.broadcast_to(jnp.arange(seq_q) * 3 // seq_q, (batch, seq_q))
      common = dict(causal=causal, segment_ids=segment_ids)
      fn = jax.jit(lambda q, k, v, do: jax.vjp(
          lambda *a: api.flash_attention(*a, implementation="pallas", **args.blocks, **common),
          q, k, v))
      ref = jax.jit(lambda q, k, v: jax.vjp(lambda *a: reference.attention(*a, **common)[0],
                                            q, k, v))
      name = f"{dtype} B={batch} T={seq_q} S={seq_k} H={heads} K={kv_heads} D={head_dim} " \
             f"causal={causal} segments={with_segments}"
      try:
        out, vjp = fn(q, k, v, do)
        expected, ref_vjp = ref(*(x.astype(jnp.float32) for x in (q, k, v)))
        pairs = [("out", out, expected),
                 *zip(("dq", "dk", "dv"), vjp(do), ref_vjp(do.astype(jnp.float32)))]
        errors = {n: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b))
                           / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30)) for n, a, b in pairs}
        ok = all(np.isfinite(e) and e <= tolerance[dtype] for e in errors.values())
        detail = " ".join(f"{n}={e:.1e}" for n, e in errors.items())
      except Exception as error:  # noqa: BLE001  (report every case, then fail)
        ok, detail = False, _failure(error)
      failures += not ok
      print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
  print(f"{failures} of {2 * len(cases)} checks failed" if failures else "all checks passed")
  return 1 if failures else 0


def _bool(text):
  if text.lower() not in ("true", "false"):
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
  return text.lower() == "true"


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/"
                      "flash_attention on GPU/TPU, a temporary folder on CPU)")
  parser.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
  parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
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
  args = parser.parse_args(argv)
  on_cpu = jax.default_backend() == "cpu"
  args.tiny = args.tiny or on_cpu
  if args.tiny:
    args.seqs, args.head_dims, args.causal = [64], [32], [True]
    args.tokens, args.dim, args.warmup, args.repeats = 128, 64, 1, 2
    args.block_q = args.block_q or 16
    args.block_k = args.block_k or 16
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
