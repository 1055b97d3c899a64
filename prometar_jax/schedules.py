"""The released optimizers as optax: torch's SGD, Dassl's epoch-stepped lr.

Both optimizers of the released code (prompts and gradnet) are
torch.optim.SGD: buf = m * buf + (g + wd * p); p -= lr * buf. `sgd` is that
update as a complete `optax.GradientTransformation` (weight decay, momentum
trace, learning rate).

Dassl steps its schedulers once per epoch, so the lr is constant within an
epoch: a function of the epoch e = step // steps_per_epoch. With a constant
warm-up of `warmup_epochs` epochs the cosine restarts its count after the
warm-up, so the last epoch does not reach 0 (docs/method.md):

  e < warmup_epochs:  warmup_lr
  e >= warmup_epochs: lr * (1 + cos(pi * (e - warmup_epochs) / E)) / 2

with E = the total number of epochs (Dassl's `T_max = MAX_EPOCH`). For
ProMetaR (lr 0.0025, 10 epochs, 1 warm-up epoch at 1e-5) this gives 1e-5,
2.5e-3, 2.4388e-3, ..., 2.387e-4.

The gradnet ("VNet") of the released code is different: its scheduler is
built but never stepped, so it trains at its warm-up lr (1e-6) for the whole
run. `schedule="constant"` reproduces that (with `lr=1e-6`).

`Optimizer.learning_rate(steps_per_epoch)` is the schedule as an optax
schedule of the step count. The step evaluates it at the iteration
(`TrainState.step`), not at optax's count of updates: the released step
updates the prompts twice per iteration through one SGD state (the plain
step and the meta step, both at the epoch's lr) and skips the second on a
single-class batch, so updates do not count iterations. The per-epoch
values are computed in double precision and rounded once to the compute
dtype; `steps_per_epoch` may be a traced value, so one compiled step serves
runs of any length.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "constant")


def warmup_cosine(
  epoch: int, lr: float, epochs: int, warmup_epochs: int, warmup_lr: float
) -> float:
  """Dassl's ConstantWarmupScheduler(CosineAnnealingLR) lr of `epoch`."""
  if epoch < warmup_epochs:
    return float(warmup_lr)
  t = epoch - warmup_epochs
  return float(lr * (1.0 + math.cos(math.pi * t / epochs)) / 2.0)


def sgd(
  learning_rate: optax.ScalarOrSchedule, momentum: float, weight_decay: float
) -> optax.GradientTransformation:
  """torch.optim.SGD (no dampening, no Nesterov) as an optax transformation.

  buf = momentum * buf + (g + weight_decay * p); update = -lr * buf, applied
  with `optax.apply_updates`. `learning_rate` is a number or an optax
  schedule of optax's update count.
  """
  return optax.chain(
    optax.add_decayed_weights(weight_decay),
    optax.trace(decay=momentum),
    optax.scale_by_learning_rate(learning_rate),
  )


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """One SGD of the released code and its lr schedule (static, hashable).

  The fields are those of `config.optim` / `config.optim_gradnet`; `epochs`
  is the length of the run (the cosine's period).
  """

  lr: float = 0.0025
  momentum: float = 0.9
  weight_decay: float = 5e-4
  schedule: str = "cosine"
  warmup_epochs: int = 1
  warmup_lr: float = 1e-5
  epochs: int = 10

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(
        f"unknown lr schedule {self.schedule!r}; use one of {SCHEDULES}"
      )

  def epoch_lr(self, epoch: int) -> float:
    """The lr of 0-based `epoch`, a Python float."""
    if self.schedule == "constant":
      return float(self.lr)
    return warmup_cosine(
      epoch, self.lr, self.epochs, self.warmup_epochs, self.warmup_lr
    )

  def learning_rate(self, steps_per_epoch) -> optax.Schedule:
    """The lr as an optax schedule of the step count (iterations done).

    Constant within an epoch; past the last epoch it stays at the last
    epoch's value.
    """
    lrs = [self.epoch_lr(e) for e in range(max(self.epochs, 1))]

    def schedule(count):
      table = jnp.asarray(lrs)  # the default float dtype
      return table[jnp.minimum(count // steps_per_epoch, len(lrs) - 1)]

    return schedule

  def sgd(self, learning_rate: optax.ScalarOrSchedule):
    """This optimizer's SGD at `learning_rate` (e.g. one iteration's lr)."""
    return sgd(learning_rate, self.momentum, self.weight_decay)

  def init(self, params) -> optax.OptState:
    """The state of `params` for this SGD at a number lr (as the step uses
    it: at each iteration's lr)."""
    return self.sgd(self.lr).init(params)
