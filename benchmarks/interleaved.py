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
               the current step;
  keep_all:    the current step with `model.remat="none"`: the backward pass
               keeps every intermediate of each block (the step before the
               default "matmuls", which keeps only the weight matmuls'
               outputs);
  baseline:    (with --baseline REV) the current step with the CLIP towers
               of git revision REV (`prometar_jax/models/clip.py` at REV,
               loaded beside the current one): what the towers' savings
               since REV are worth.

Ratios are against the first variant of --variants.

  python benchmarks/interleaved.py --classes 10 --rounds 4
  python benchmarks/interleaved.py --variants keep_all,groups_slots
  python benchmarks/interleaved.py --variants baseline,groups_slots \
    --baseline d4cf46c --rounds 4
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from prometar_jax import meta_step
from prometar_jax import prompt_learners as pl

try:
  from benchmarks.step import (
    SHARED,
    realistic_prompt_ids,
    step_inputs,
    text_groups,
  )
except ImportError:  # run as a script from benchmarks/
  from step import SHARED, realistic_prompt_ids, step_inputs, text_groups


def all_rows(task):
  """The inner step on every row (the support masked), as before."""
  return jnp.arange(task.support.shape[0])


def clip_module_at(rev: str):
  """prometar_jax/models/clip.py of git revision `rev`, as its own module."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  text = subprocess.run(
    ["git", "-C", repo, "show", f"{rev}:prometar_jax/models/clip.py"],
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  path = os.path.join(tempfile.mkdtemp(), f"clip_{rev}.py")
  with open(path, "w") as f:
    f.write(text)
  spec = importlib.util.spec_from_file_location(f"clip_{rev}", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def revision_layout(towers, params):
  """`params` as REV's towers read them: before the last layer was stored
  apart ("last_layer"), each encoder held one stack of every layer."""
  if hasattr(towers, "encoder_layer"):
    return params

  def merged(encoder):
    return {
      "layers": jax.tree.map(
        lambda head, last: jnp.concatenate([head, last[None]]),
        encoder["layers"],
        encoder["last_layer"],
      )
    }

  out = dict(params)
  for tower in ("vision_model", "text_model"):
    out[tower] = dict(params[tower], encoder=merged(params[tower]["encoder"]))
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--classes", type=int, default=10)
  ap.add_argument("--rounds", type=int, default=4)
  ap.add_argument("--variants", default="one_trim,groups,groups_slots")
  ap.add_argument("--baseline", default=None, help="git revision (baseline)")
  args = ap.parse_args()

  raw = realistic_prompt_ids(args.classes)
  grouped = pl.bucket_token_ids(raw, 4, shared_rows=SHARED)
  current = meta_step.support_slots
  # (token ids, inner-step rows, towers of another revision, model.remat)
  known = {
    "one_trim": (pl.trim_token_ids(raw, multiple=8), all_rows, None, None),
    "groups": (grouped, all_rows, None, None),
    "groups_slots": (grouped, current, None, None),
    "keep_all": (grouped, current, None, "none"),
  }
  if args.baseline:
    revision = clip_module_at(args.baseline)
    known["baseline"] = (grouped, current, revision, None)
  variants = {n: known[n] for n in args.variants.split(",")}

  compiled = {}
  for name, (ids, slots, towers, remat) in variants.items():
    # Traced now, so the rows rule of this variant is baked into its step.
    meta_step.support_slots = slots
    frozen, spec, state, batch = step_inputs(args.classes, ids)
    if remat is not None:
      frozen = frozen.replace(clip=frozen.clip.replace(remat=remat))
    if towers is not None:  # the same weights through REV's tower code
      clip = frozen.clip
      params = revision_layout(towers, clip.params)
      clip = towers.CLIP(towers.VIT_B16, params, dtype=clip.dtype)
      frozen = frozen.replace(clip=clip)
    args_ = (state, frozen, batch)
    step = jax.jit(functools.partial(meta_step.train_step, spec=spec))
    t = time.perf_counter()
    fn = step.lower(*args_).compile()
    compile_s = time.perf_counter() - t
    out = jax.block_until_ready(fn(*args_))
    compiled[name] = (fn, args_, out[0].prompts)
    positions = sum(c * n for c, n in text_groups(ids))
    print(f"{name}: compile {compile_s:.1f} s, {positions} text positions")
  meta_step.support_slots = current

  first = next(iter(compiled))
  ref = compiled[first][2]
  for name, (_, _, got) in compiled.items():
    diff = max(
      float(jnp.abs(a - b).max())
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref))
    )
    print(f"{name}: max |prompts - {first}'s| after one step = {diff:.1e}")

  times = {name: [] for name in compiled}
  for r in range(args.rounds):
    for name, (fn, args_, _) in compiled.items():
      t = time.perf_counter()
      jax.block_until_ready(fn(*args_))
      times[name].append(time.perf_counter() - t)
    print(
      f"round {r}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items())
    )
  base = times[first]
  for name, t in times.items():
    ratio = statistics.median(b / x for b, x in zip(base, t))
    print(
      f"{name:>13}: median {statistics.median(t):.2f} s per step, "
      f"{ratio:.2f}x the speed of {first} (median of per-round ratios)"
    )


if __name__ == "__main__":
  main()
