"""Losses of ProMetaR: cross-entropy, label-mixed cross-entropy, L1 regularizers.

Everything takes masks instead of slicing, so shapes stay fixed under jit:
`rows` masks samples (support / query / padding), `class_mask` masks padded
classes out of the softmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Logit of a padded class: exp() of it is exactly 0 in float32.
_MASKED_LOGIT = -1e9


def masked_mean(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean of x over the entries where mask is true (mask broadcasts)."""
  if mask is None:
    return jnp.mean(x)
  mask = jnp.broadcast_to(mask, x.shape).astype(x.dtype)
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def mask_classes(logits: jax.Array, class_mask: jax.Array | None) -> jax.Array:
  if class_mask is None:
    return logits
  return jnp.where(class_mask[None, :], logits, _MASKED_LOGIT)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-sample cross-entropy [N] of logits [N, C] and int labels [N]."""
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  logp = jax.nn.log_softmax(logits.astype(dtype), axis=-1)
  return -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]


def mixup_cross_entropy(logits, labels_a, labels_b, lam) -> jax.Array:
  """Per-sample lam * CE(y_a) + (1 - lam) * CE(y_b) (the official query loss)."""
  return lam * cross_entropy(logits, labels_a) + (1 - lam) * cross_entropy(
    logits, labels_b
  )


def l1_regularizer(features, target, weight, rows=None) -> jax.Array:
  """weight * mean |features - target| over the masked rows and all columns.

  ProMetaR's consistency terms: 50 * this for the normalized prompted text
  features against the frozen template teacher (rows = real classes), and
  20 * this for the normalized prompted image features against the frozen
  CLIP image features (rows = the samples of the current task).
  """
  mask = None if rows is None else rows[:, None]
  return weight * masked_mean(jnp.abs(features - target), mask)
