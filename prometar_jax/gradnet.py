"""The gradient-modulation network M^phi of ProMetaR (the official "VNet").

For each prompt tensor P [n_ctx, d] (one per layer and branch) a pair of
bias-free linear maps with no nonlinearity between them reads the task and
regularizer gradients and gates the latter:

  gamma = sigmoid(vec([g_ce; g_reg]) @ W1 @ W2), each unit repeated dim_rate
          times over consecutive flattened entries, reshaped to [n_ctx, d];
  modulated gradient = g_ce + gamma * g_reg.

Weights are stacked over depth exactly like the prompts, so the layer is an
array axis and the per-layer maps are one `jax.vmap`. Kernels use the Flax
[in, out] layout (the official torch weights are [out, in]).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def init_gradnet(
  key: jax.Array, prompt_shapes: dict[str, tuple[int, int, int]], dim_rate: int
) -> PyTree:
  """{branch: {"w1": [depth, 2*n*d, n*d/r], "w2": [depth, n*d/r, n*d/r]}}.

  Initialised like torch's nn.Linear default (kaiming_uniform, a=sqrt(5)):
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  """
  out = {}
  for i, (branch, (depth, n_ctx, d)) in enumerate(
    sorted(prompt_shapes.items())
  ):
    size = n_ctx * d
    if size % dim_rate:
      raise ValueError(
        f"{branch} prompts have n_ctx*width = {size}, not a multiple of "
        f"dim_rate = {dim_rate}; pick a dim_rate that divides it."
      )
    hidden = size // dim_rate
    k1, k2 = jax.random.split(jax.random.fold_in(key, i))

    def uniform(k, shape):
      bound = 1.0 / jnp.sqrt(shape[-2])
      return jax.random.uniform(k, shape, minval=-bound, maxval=bound)

    out[branch] = {
      "w1": uniform(k1, (depth, 2 * size, hidden)),
      "w2": uniform(k2, (depth, hidden, hidden)),
    }
  return out


def gate_logits(weights: PyTree, g_ce: jax.Array, g_reg: jax.Array):
  """Pre-sigmoid gates [depth, n*d/r] of one branch ([depth, n, d] grads)."""

  def one_layer(w1, w2, a, b):
    x = jnp.concatenate([a, b], axis=0).reshape(-1)  # row-major vec
    return x @ w1 @ w2

  return jax.vmap(one_layer)(weights["w1"], weights["w2"], g_ce, g_reg)


def gamma(weights: PyTree, g_ce: jax.Array, g_reg: jax.Array) -> jax.Array:
  """The gate [depth, n_ctx, d]: each unit covers dim_rate neighbours."""
  logits = gate_logits(weights, g_ce, g_reg)
  rate = g_ce[0].size // logits.shape[-1]
  return jnp.repeat(jax.nn.sigmoid(logits), rate, axis=-1).reshape(g_ce.shape)


def modulate(gradnet: PyTree, g_ce: PyTree, g_reg: PyTree, default_gamma=0.5):
  """g_ce + gamma * g_reg for every trainable leaf, and the gammas.

  Branches with a gradnet ("text", "vision") get their learned gate; any
  other trainable leaf (MaPLe's coupling maps) gets `default_gamma`.
  """
  combined, gammas = {}, {}
  for name in g_ce:
    if name in gradnet:
      gam = gamma(gradnet[name], g_ce[name], g_reg[name])
      gammas[name] = gam
      combined[name] = g_ce[name] + gam * g_reg[name]
    else:
      combined[name] = jax.tree.map(
        lambda a, b: a + default_gamma * b, g_ce[name], g_reg[name]
      )
  return combined, gammas


def count_params(gradnet: PyTree) -> int:
  return sum(x.size for x in jax.tree.leaves(gradnet))
