"""The step at two git revisions, in alternating fresh processes.

`interleaved.py` times variants in turns inside one process, which suits
variants of the same code; across revisions (another tower layout, another
attention) one process cannot hold both, and a process that has compiled
several big programs runs slower than a fresh one (up to 1.2x here: the
layer loop read 1.35x in one process, 1.13x in fresh ones). This script
checks each revision out into a temporary git worktree and runs
`step.py --point` from it, revision after revision, round after round, so
the machine's drift falls on both alike. The compilation cache is shared
(rounds after the first skip compiling).

  python benchmarks/alternate.py --revs 367a478,d7242ce --classes 10
  python benchmarks/alternate.py --revs main~3,main --classes 40 --rounds 3

Ratios are the first revision's step time over each other's (above 1: the
later one is faster), median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git(*args: str) -> str:
  return subprocess.run(
    ["git", "-C", REPO, *args], capture_output=True, text=True, check=True
  ).stdout.strip()


def run_point(tree: str, point: str, steps: int, cache: str) -> dict:
  env = dict(os.environ, PYTHONPATH=tree, JAX_COMPILATION_CACHE_DIR=cache)
  proc = subprocess.run(
    [sys.executable, "benchmarks/step.py", "--point", point]
    + ["--steps", str(steps)],
    cwd=tree,
    env=env,
    capture_output=True,
    text=True,
  )
  if proc.returncode != 0:
    raise SystemExit(
      f"the point failed in {tree}:\n{(proc.stdout + proc.stderr)[-2000:]}"
    )
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--revs", required=True, help="comma-separated revisions")
  ap.add_argument("--classes", type=int, default=10)
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--steps", type=int, default=3, help="timed steps a run")
  ap.add_argument("--remat", action="store_true")
  args = ap.parse_args()

  revs = args.revs.split(",")
  commits = {rev: git("rev-parse", "--short", rev) for rev in revs}
  point = f"{args.classes}:float32:{int(args.remat)}"
  with tempfile.TemporaryDirectory() as tmp:
    trees = {}
    for rev in revs:
      trees[rev] = os.path.join(tmp, commits[rev])
      git("worktree", "add", "--detach", trees[rev], commits[rev])
    try:
      times = {rev: [] for rev in revs}
      for r in range(args.rounds):
        for rev in revs:
          row = run_point(
            trees[rev], point, args.steps, os.path.join(tmp, "cache")
          )
          times[rev].append(row["step_s_median"])
          print(
            f"round {r} {rev} ({commits[rev]}): {row['step_s_median']:.2f} s "
            f"(steps {', '.join(f'{t:.2f}' for t in row['step_s_all'])}), "
            f"compile {row['compile_s']:.1f} s, peak "
            f"{row['peak_rss_gib']:.2f} GiB, matmul "
            f"{row['matmul_tflop_s']:.3f} TFLOP/s",
            flush=True,
          )
    finally:
      for rev in revs:
        git("worktree", "remove", "--force", trees[rev])
  first = times[revs[0]]
  for rev in revs:
    ratios = [a / b for a, b in zip(first, times[rev])]
    print(
      f"{rev:>12}: median {statistics.median(times[rev]):.2f} s, "
      f"{statistics.median(ratios):.3f}x the speed of {revs[0]} "
      f"(per round: {', '.join(f'{x:.3f}' for x in ratios)})"
    )


if __name__ == "__main__":
  main()
