"""The divergence guard: a run stops at the first unhealthy check.

A run is checked at every log flush and before every checkpoint save:

* every logged metric of every step since the last check is finite;
* every loss metric (`loss_*`) is at most `max_loss`;
* every float leaf of the state (prompts, gradnet, optimizer states) is
  finite;
* the prompts' global L2 norm is at most `max_prompt_norm_ratio` times
  their initial norm. A learning rate far too large can blow the prompts
  up to ~1e31 with finite values and a zero gradient (saturated softmax):
  no NaN ever appears, so finiteness alone would let the run "finish".

A failed check raises `TrainingDiverged` naming the step, its epoch and
batch and the value; checkpoints are saved only after a passed check, so
every kept checkpoint passed these checks (the retention of the newest
`max_to_keep` never deletes the last good one: nothing newer is saved).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prometar_jax.errors import TrainingDiverged

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Bounds:
  """`config.guard`: the largest healthy prompt norm ratio and loss."""

  max_prompt_norm_ratio: float = 100.0
  max_loss: float = 1e4


def _float_leaves(tree):
  return [
    x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)
  ]


def global_norm(tree: PyTree) -> jax.Array:
  return jnp.sqrt(
    sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in _float_leaves(tree))
  )


@jax.jit
def state_health(state) -> dict:
  """{"finite": every float leaf finite, "prompt_norm": ||prompts||}."""
  leaves = _float_leaves(state)
  finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves]))
  return {"finite": finite, "prompt_norm": global_norm(state.prompts)}


class Guard:
  """Checks metrics and states against `bounds`; raises TrainingDiverged.

  Args:
    bounds: the limits.
    initial_norm: the prompts' norm at initialisation (the same on resume:
      the initial prompts are a function of the seed).
    where: step -> "epoch e/E, batch b/B" for messages.
  """

  def __init__(
    self, bounds: Bounds, initial_norm: float, where: Callable[[int], str]
  ):
    self.bounds = bounds
    self.initial_norm = float(initial_norm)
    self.where = where

  def _fail(self, step: int, what: str):
    raise TrainingDiverged(
      f"training diverged at step {step} ({self.where(step - 1)}): {what}"
    )

  def check_metrics(self, fetched: Sequence[tuple[int, dict]]) -> None:
    """`fetched`: (0-based step, host metrics) pairs, in step order."""
    for step, m in fetched:
      bad = sorted(k for k, v in m.items() if not np.all(np.isfinite(v)))
      if bad:
        self._fail(step + 1, f"non-finite {', '.join(bad)}")
      for k, v in m.items():
        if k.startswith("loss") and float(v) > self.bounds.max_loss:
          self._fail(
            step + 1,
            f"{k} = {float(v):.4g} > config.guard.max_loss = "
            f"{self.bounds.max_loss:g}",
          )

  def check_state(self, step: int, state) -> float:
    """Checks the state after `step` steps; returns its prompt norm ratio."""
    h = jax.device_get(state_health(state))
    if not bool(h["finite"]):
      self._fail(step, "non-finite values in the training state")
    ratio = float(h["prompt_norm"]) / max(self.initial_norm, 1e-12)
    if not ratio <= self.bounds.max_prompt_norm_ratio:
      self._fail(
        step,
        f"the prompts' norm is {float(h['prompt_norm']):.4g}, {ratio:.4g}x "
        f"its initial {self.initial_norm:.4g} (config.guard."
        f"max_prompt_norm_ratio = {self.bounds.max_prompt_norm_ratio:g})",
      )
    return ratio
