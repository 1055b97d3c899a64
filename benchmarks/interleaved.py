"""The step with and without its exact savings, timed in turns in one process.

This machine's speed drifts by up to 1.5x over minutes (a 2048^2 matmul
loop alone varies 178-224 GFLOP/s), so two benchmark runs minutes apart
cannot resolve a 10-20% change. Here every variant is compiled first, then
the variants run in turns, round after round, and the ratios are taken
within each round.

Variants (ViT-B/16 shapes, random weights, batch 4, IVLP 4+4 at depth 9,
second order, class prompts of realistic lengths as in `step.py`):

  one_trim:    every class prompt trimmed to the longest one, the inner step
               on all B rows (the step before these savings);
  groups:      class prompts in length groups (`bucket_token_ids`);
  groups_slots: and the inner step on B - 1 support slots (`support_slots`):
               the current step.

  python benchmarks/interleaved.py --classes 10 --rounds 4
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp

from prometar_jax import meta_step
from prometar_jax import prompt_learners as pl

try:
  from benchmarks.step import realistic_prompt_ids, step_inputs, text_groups
except ImportError:  # run as a script from benchmarks/
  from step import realistic_prompt_ids, step_inputs, text_groups


def all_rows(task):
  """The inner step on every row (the support masked), as before."""
  return jnp.arange(task["support"].shape[0])


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--classes", type=int, default=10)
  ap.add_argument("--rounds", type=int, default=4)
  args = ap.parse_args()

  raw = realistic_prompt_ids(args.classes)
  grouped = pl.bucket_token_ids(raw, 2)
  variants = {
    "one_trim": (pl.trim_token_ids(raw, multiple=8), all_rows),
    "groups": (grouped, all_rows),
    "groups_slots": (grouped, meta_step.support_slots),
  }

  current_slots = meta_step.support_slots
  compiled = {}
  for name, (ids, slots) in variants.items():
    # Traced now, so the rows rule of this variant is baked into its step.
    meta_step.support_slots = slots
    clip, feats, spec, state, batch = step_inputs(args.classes, ids)
    args_ = (state, clip, feats, batch, 0.0025, 1e-6)
    step = jax.jit(functools.partial(meta_step.train_step, spec=spec))
    t = time.perf_counter()
    fn = step.lower(*args_).compile()
    compile_s = time.perf_counter() - t
    out = jax.block_until_ready(fn(*args_))
    compiled[name] = (fn, args_, out[0].prompts)
    positions = sum(c * n for c, n in text_groups(ids))
    print(f"{name}: compile {compile_s:.1f} s, {positions} text positions")
  meta_step.support_slots = current_slots

  ref = compiled["one_trim"][2]
  for name, (_, _, got) in compiled.items():
    diff = max(
      float(jnp.abs(a - b).max())
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref))
    )
    print(f"{name}: max |prompts - one_trim's| after one step = {diff:.1e}")

  times = {name: [] for name in compiled}
  for r in range(args.rounds):
    for name, (fn, args_, _) in compiled.items():
      t = time.perf_counter()
      jax.block_until_ready(fn(*args_))
      times[name].append(time.perf_counter() - t)
    print(
      f"round {r}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items())
    )
  base = times["one_trim"]
  for name, t in times.items():
    ratio = statistics.median(b / x for b, x in zip(base, t))
    print(
      f"{name:>13}: median {statistics.median(t):.2f} s per step, "
      f"{ratio:.2f}x the speed of one_trim (median of per-round ratios)"
    )


if __name__ == "__main__":
  main()
