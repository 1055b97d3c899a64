"""Gradient-alignment analysis of ProMetaR (docs/method.md).

Pure functions over the training pytrees (prompts, gradnet, frozen CLIP,
class features); see `measures.py` for the measures and `runs.py` for
measuring them along a run's checkpoints.

Public API:
  cosines(a, b), dots(a, b): overall / per-branch / per-layer cosines and
    inner products of two prompt pytrees.
  sample_split(key, labels, support_size): a class-disjoint query/support
    split of a pool as masks.
  alignment(params, gnet, clip, feats, pool, key, spec=..., num_splits=...):
    cosines of the task, regularizer, modulated-regularizer and update
    gradients with the held-out-class gradient, averaged over random
    splits, and gamma statistics per layer.
  first_order_check(params, gnet, clip, feats, pool, split, alphas,
    spec=...): L_val(theta - a u) - L_val(theta) against -a <grad L_val, u>.
  with_mode(spec, mode, fixed_gamma): the same spec with another update rule.
  alignment_along_run(checkpoint_dir, clip, feats, pool, key, spec=...):
    `alignment` at every saved step of a run.
  load_pool(items, image_size=...), class_features(spec, clip, classnames),
    checkpoint_dir(workdir, dataset, seed), save_json(path, tree).
"""

from prometar_jax.analysis.measures import (
  DIRECTIONS,
  alignment,
  cosines,
  dots,
  first_order_check,
  heldout_gradient,
  pool_vjp,
  sample_split,
  with_mode,
)
from prometar_jax.analysis.runs import (
  alignment_along_run,
  checkpoint_dir,
  class_features,
  load_pool,
  restore_states,
  save_json,
  state_target,
  to_jsonable,
)

__all__ = [
  "DIRECTIONS",
  "alignment",
  "alignment_along_run",
  "checkpoint_dir",
  "class_features",
  "cosines",
  "dots",
  "first_order_check",
  "heldout_gradient",
  "load_pool",
  "pool_vjp",
  "restore_states",
  "sample_split",
  "save_json",
  "state_target",
  "to_jsonable",
  "with_mode",
]
