"""What `implementation="auto"` runs: cuDNN or XLA on GPU unless a measurement says otherwise.

The rule, per call:
- CPU: XLA (the Pallas interpreter is for tests, never a default).
- TPU: the Pallas kernel where it compiles for these shapes, else XLA (no cuDNN there, and the
  kernel holds one head's k and v in VMEM; see `api._pallas_unsupported`).
- GPU: the baseline is cuDNN where `jax.nn.dot_product_attention(implementation="cudnn")` serves
  the call: bfloat16 or float16, head_dim a multiple of 8 up to 256 on Hopper and later (128
  before), and no mask other than causal (segment ids would reach cuDNN as a dense [B, 1, T, S]
  bias: an arbitrary mask, materialized, which is not what it is fast at); otherwise XLA. A
  Pallas kernel ("pallas", the Triton one, or any other Pallas implementation `api` lists,
  such as "mosaic") replaces the baseline only where `measured.json` has a row for this device
  kind, dtype, head_dim, causal and masked in which that kernel was faster than the baseline
  measured in the same run. No row, no Pallas: an unmeasured kernel is never the default.

`measured.json` is data written only by device runs (`python -m kernels.flash_attention.bench
--record` on a GPU, which refuses to record on CPU); it ships with no rows.
"""

from __future__ import annotations

import datetime
import functools
import json
from pathlib import Path

TABLE = Path(__file__).resolve().parent / "measured.json"
KEY_FIELDS = ("device_kind", "dtype", "head_dim", "causal", "masked")
# Implementations that are this package's Pallas kernels (the rest, xla and cudnn, are jax's).
PALLAS_FAMILY = ("pallas", "mosaic")


def _read(path: Path) -> list[dict]:
  return json.loads(path.read_text())["rows"] if path.exists() else []


@functools.cache  # read once per process: "auto" is decided at every trace
def load_table(path: Path = TABLE) -> tuple[dict, ...]:
  return tuple(_read(path))


def _key(row) -> tuple:
  return tuple(row[name] for name in KEY_FIELDS)


def lookup(table, device_kind: str, dtype: str, head_dim: int, causal: bool,
           masked: bool) -> dict | None:
  """The measured row for this case ({implementation: TFLOP/s} under "tflops"), or None."""
  key = (device_kind, dtype, head_dim, causal, masked)
  return next((row for row in table if _key(row) == key), None)


def cudnn_unsupported(dtype: str, head_dim: int, masked: bool,
                      compute_capability: str | None) -> str | None:
  """Why cuDNN flash attention (as jax.nn.dot_product_attention calls it) does not serve this,
  or None. Mirrors jax/_src/cudnn/fused_attention_stablehlo.py (jax 0.10.2):
  `check_qkv_layout` (fp16/bf16/fp8 only) and `check_is_flash_attention` (head dim)."""
  if dtype not in ("bfloat16", "float16"):
    return f"cuDNN flash attention takes bfloat16 or float16, not {dtype}"
  hopper = compute_capability is not None and float(compute_capability) >= 9.0
  max_head_dim = 256 if hopper else 128
  if head_dim % 8 or head_dim > max_head_dim:
    return f"head_dim={head_dim} must be a multiple of 8 up to {max_head_dim} for cuDNN"
  if masked:
    return "segment ids would reach cuDNN as a dense bias"
  return None


def choose(backend: str, *, device_kind: str, compute_capability: str | None, dtype: str,
           head_dim: int, causal: bool, masked: bool, interpret: bool,
           pallas_unsupported: dict[str, str | None], table=None) -> str:
  """The implementation "auto" runs. `pallas_unsupported` maps each Pallas implementation
  available here to why it cannot run these shapes (None: it can); `table` defaults to the
  rows of measured.json."""
  if backend == "tpu":
    return "pallas" if not interpret and pallas_unsupported.get("pallas") is None else "xla"
  if backend != "gpu" or interpret:
    return "xla"
  baseline = "xla" if cudnn_unsupported(dtype, head_dim, masked, compute_capability) else "cudnn"
  row = lookup(load_table() if table is None else table, device_kind, dtype, head_dim, causal,
               masked)
  if row is None or baseline not in row["tflops"]:
    return baseline
  candidates = [(tflops, impl) for impl, tflops in row["tflops"].items()
                if impl in pallas_unsupported and pallas_unsupported[impl] is None
                and tflops > row["tflops"][baseline]]
  return max(candidates)[1] if candidates else baseline


def record(bench_rows: list[dict], device_kind: str, jax_version: str, command: str,
           path: Path = TABLE) -> list[dict]:
  """Adds the forward+backward TFLOP/s of every implementation in a benchmark run to the
  table, one row per (dtype, head_dim, causal, masked) at the run's longest sequence (where
  attention dominates); a new row replaces an older one with the same key. Returns the rows
  written."""
  table = _read(path)
  groups = {}
  for r in bench_rows:
    if r["mode"] == "fwd+bwd" and r["status"] == "ok":
      groups.setdefault((r["dtype"], r["head_dim"], r["causal"], r.get("masked", False)),
                        []).append(r)
  written = []
  for (dtype, head_dim, causal, masked), rows in sorted(groups.items()):
    seq = max(r["seq"] for r in rows)
    at_seq = [r for r in rows if r["seq"] == seq]
    written.append(dict(
        device_kind=device_kind, dtype=dtype, head_dim=head_dim, causal=causal, masked=masked,
        tflops={r["impl"]: round(r["tflops"], 2) for r in at_seq},
        seq=seq, batch=at_seq[0]["batch"], heads=at_seq[0]["heads"], mode="fwd+bwd",
        date=datetime.date.today().isoformat(), jax=jax_version, command=command))
  keys = {_key(row) for row in written}
  table = [row for row in table if _key(row) not in keys] + written
  path.write_text(json.dumps(dict(about=TABLE_ABOUT, rows=table), indent=1) + "\n")
  load_table.cache_clear()
  return written


TABLE_ABOUT = ("Measured forward+backward TFLOP/s per attention implementation, read by "
               "kernels/flash_attention/dispatch.py for implementation='auto'. Written only "
               "by `python -m kernels.flash_attention.bench --record` on a device; never edit "
               "by hand.")
