"""Kill-and-resume trials: does a run killed at a random moment resume exactly, losing nothing?

Each trial starts `gpt_shakespeare:tiny` in a subprocess, sends it SIGTERM, SIGINT or SIGKILL
at a random step or just as a checkpoint is being written, resumes it with the same command,
and compares its metrics.jsonl (all but timing fields) with one uninterrupted run.

  python -m benchmarks.fault_trials --trials 20 [--out benchmarks/results/fault_trials.md]

A checkpoint is lost if the newest complete checkpoint before the kill is not in the folder,
readable, after it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMING = {"step_time_ms", "tokens_per_second", "mfu", "wall_s"}
SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT, "SIGKILL": signal.SIGKILL}
RUN_ARGS = ["--config.steps=600", "--config.decay_steps=600", "--config.checkpoint_every=40",
            "--config.eval_every=100", "--config.log_every=5", "--config.progress_bar=false",
            "--config.model.dropout=0.1"]


def start(workdir: Path, *extra: str) -> subprocess.Popen:
  env = {**os.environ, "XLA_FLAGS": "", "TF_CPP_MIN_LOG_LEVEL": "2",
         "JAX_COMPILATION_CACHE_DIR": str(REPO / ".cache" / "jax")}
  return subprocess.Popen([sys.executable, "-m", "experiments", "gpt_shakespeare:tiny",
                           f"--config.workdir={workdir}", *RUN_ARGS, *extra],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def curves(workdir: Path) -> list[dict]:
  rows = []
  path = workdir / "metrics.jsonl"
  for line in path.read_text().splitlines() if path.exists() else []:
    try:
      rows.append({k: v for k, v in json.loads(line).items() if k not in TIMING})
    except json.JSONDecodeError:
      pass
  return rows


def last_train_step(workdir: Path) -> int:
  steps = [r["step"] for r in curves(workdir) if r["split"] == "train"]
  return max(steps, default=0)


def complete_checkpoints(workdir: Path) -> set[int]:
  folder = workdir / "checkpoints"
  if not folder.exists():
    return set()
  return {int(p.name) for p in folder.iterdir() if p.name.isdigit()}


def writing_checkpoint(workdir: Path) -> bool:
  folder = workdir / "checkpoints"
  return folder.exists() and any("tmp" in p.name for p in folder.iterdir())


def wait_until(predicate, process: subprocess.Popen, timeout: float = 300) -> bool:
  """Polls `predicate` until true; False if the process ended first."""
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    if predicate():
      return True
    if process.poll() is not None:
      return False
    time.sleep(0.002)
  raise TimeoutError("the run did not get there in time")


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
  _, err = process.communicate(timeout=timeout)
  return process.returncode, err


def trial(rng: random.Random, workdir: Path, reference: list[dict]) -> dict:
  name = rng.choice(sorted(SIGNALS))
  moment = rng.choice(["step", "checkpoint"])
  process = start(workdir)
  if moment == "step":
    target = rng.randrange(20, 560)
    reached = wait_until(lambda: last_train_step(workdir) >= target, process)
  else:  # Right after a checkpoint step is logged, while its files are written.
    target = 40 * rng.randrange(1, 14)
    reached = wait_until(lambda: last_train_step(workdir) >= target, process)
  before = complete_checkpoints(workdir)
  mid_write = writing_checkpoint(workdir)
  if reached:
    process.send_signal(SIGNALS[name])
  code, err = finish(process)
  after = complete_checkpoints(workdir)
  lost = bool(before) and max(before) not in after and not any(s > max(before) for s in after)
  resumed = start(workdir)
  resume_code, resume_err = finish(resumed)
  identical = resume_code == 0 and curves(workdir) == reference
  return {"signal": name, "moment": moment, "target_step": target, "killed": reached,
          "exit_code": code, "mid_write": mid_write, "checkpoints_before": sorted(before),
          "checkpoints_after": sorted(after), "lost_checkpoint": lost,
          "resume_exit_code": resume_code, "identical": identical,
          "error": "" if identical else (resume_err.strip().splitlines() or [""])[-1]}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--trials", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", type=Path, default=None, help="write a Markdown report here")
  args = parser.parse_args(argv)
  rng = random.Random(args.seed)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    code, err = finish(start(tmp / "reference"))
    if code != 0:
      print(err, file=sys.stderr)
      return 1
    reference = curves(tmp / "reference")
    results = []
    for i in range(args.trials):
      result = trial(rng, tmp / f"trial{i}", reference)
      results.append(result)
      print(json.dumps(result), flush=True)
  identical = sum(r["identical"] for r in results)
  lost = sum(r["lost_checkpoint"] for r in results)
  summary = f"{args.trials} trials: {identical} resumed identically, {lost} lost checkpoints"
  print(summary)
  if args.out:
    by_kind = collections.Counter((r["signal"], r["moment"]) for r in results)
    lines = [f"# Fault trials ({time.strftime('%Y-%m-%d')})", "",
             f"`python -m benchmarks.fault_trials --trials {args.trials} --seed {args.seed}` on "
             f"{os.cpu_count()} CPU cores; run: `gpt_shakespeare:tiny {' '.join(RUN_ARGS)}`.", "",
             f"**{summary}.** Kills that landed while a checkpoint was being written: "
             f"{sum(r['mid_write'] for r in results)}.", "",
             "| signal | moment | trials |", "|---|---|---|"]
    lines += [f"| {s} | {m} | {n} |" for (s, m), n in sorted(by_kind.items())]
    lines += ["", "| # | signal | moment | step | exit | mid-write | checkpoints after kill | "
              "identical |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {i} | {r['signal']} | {r['moment']} | {r['target_step']} | {r['exit_code']} | "
              f"{r['mid_write']} | {r['checkpoints_after']} | {r['identical']} |"
              for i, r in enumerate(results)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
  return 0 if identical == args.trials and lost == 0 else 1


if __name__ == "__main__":
  sys.exit(main())
