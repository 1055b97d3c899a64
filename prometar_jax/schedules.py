"""Per-epoch learning rates, computed on the host (Dassl's epoch-stepped LR).

Dassl steps its schedulers once per epoch (ProMetaR calls `update_lr()` on
the last batch of each epoch), so the lr is constant within an epoch and the
training loop passes it to the jitted step as a traced scalar: changing it
never retraces. With a constant warm-up of `warmup_epochs` epochs the cosine
restarts its count after the warm-up (DATA.md 3.5), so the last epoch does
not reach 0:

  epoch e < warmup_epochs:  warmup_lr
  epoch e >= warmup_epochs: lr * (1 + cos(pi * (e - warmup_epochs) / E)) / 2

with E = the total number of epochs (Dassl's `T_max = MAX_EPOCH`). For
ProMetaR (lr 0.0025, 10 epochs, 1 warm-up epoch at 1e-5) this gives 1e-5,
2.5e-3, 2.4388e-3, ..., 2.387e-4.

The gradnet ("VNet") of the released code is different: its scheduler is
built but never stepped, so it trains at its warm-up lr (1e-6) for the whole
run. `schedule="constant"` reproduces that (with `lr=1e-6`).
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "constant")


def warmup_cosine(
  epoch: int, lr: float, epochs: int, warmup_epochs: int, warmup_lr: float
) -> float:
  """Dassl's ConstantWarmupScheduler(CosineAnnealingLR) lr of `epoch`."""
  if epoch < warmup_epochs:
    return float(warmup_lr)
  t = epoch - warmup_epochs
  return float(lr * (1.0 + math.cos(math.pi * t / epochs)) / 2.0)


def epoch_lr(optim, epoch: int, epochs: int) -> float:
  """The lr of 0-based `epoch` under an optimizer config.

  Args:
    optim: a config with `schedule` ("cosine" or "constant"), `lr`,
      `warmup_epochs` and `warmup_lr` (`config.optim`,
      `config.optim_gradnet`).
    epoch: 0-based epoch index.
    epochs: the length of the run (the cosine's period).

  Returns:
    The learning rate, a Python float.
  """
  if optim.schedule == "constant":
    return float(optim.lr)
  if optim.schedule == "cosine":
    return warmup_cosine(
      epoch, optim.lr, epochs, optim.warmup_epochs, optim.warmup_lr
    )
  raise ValueError(
    f"unknown lr schedule {optim.schedule!r}; use one of {SCHEDULES}"
  )
