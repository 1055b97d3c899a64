"""The study's figures (PNG): average HM per arm, the shots sweep, the gate.

Needs matplotlib (requirements-test.txt); the driver skips the figures
when it is not installed. Each function reads the results dict of
study/run.py and writes one file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from study import analysis  # noqa: E402


def _average_rows(table):
  return [r for r in table["rows"] if r["task"] == analysis.AVERAGE]


def differences(out: Mapping, path: str, labels: Mapping[str, str]) -> str:
  """Paired ΔBase / ΔNew / ΔHM vs IVLP with 95% t intervals, per arm
  (the average over tasks), one panel per metric."""
  rows = [r for r in _average_rows(out["main"]) if r["diff"] is not None]
  fig, axes = plt.subplots(1, 3, figsize=(11, 0.6 * len(rows) + 1.6))
  for ax, m in zip(axes, analysis.METRICS):
    for i, r in enumerate(rows):
      d = r["diff"][m]
      lo, hi = d["low"], d["high"]
      ax.plot([lo, hi], [i, i], color="C0", lw=2)
      ax.plot([d["mean"]], [i], "o", color="C0")
      ax.plot(d["per_seed"], [i + 0.15] * len(d["per_seed"]), ".", color="0.5")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([labels.get(r["arm"], r["arm"]) for r in rows])
    ax.set_title(f"Δ{m} vs IVLP (average)")
    ax.invert_yaxis()
    if ax is not axes[0]:
      ax.set_yticklabels([])
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def sweep(out: Mapping, path: str, labels: Mapping[str, str]) -> str:
  """Average Base, New and HM against shots, IVLP and the chosen arm."""
  shots = sorted(int(k) for k in out["sweep"])
  fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
  arms = out["sweep"][str(shots[-1])]["arms"]
  for ax, m in zip(axes, analysis.METRICS):
    for arm in arms:
      ys = []
      for k in shots:
        row = [
          r for r in _average_rows(out["sweep"][str(k)]) if r["arm"] == arm
        ]
        ys.append(row[0][m] if row else math.nan)
      ax.plot(shots, ys, "o-", label=labels.get(arm, arm))
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots)
    ax.set_xticklabels([str(k) for k in shots])
    ax.set_xlabel("shots")
    ax.set_title(f"average {m}")
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def gate(out: Mapping, path: str, labels: Mapping[str, str]) -> str:
  """The gate's per-layer mean over training (mean ± sd over runs)."""
  curves = out["gate_curves"]
  arms = list(curves)
  branches = sorted({b for a in arms for b in curves[a]})
  fig, axes = plt.subplots(
    len(branches),
    len(arms),
    figsize=(3.6 * len(arms), 2.8 * len(branches)),
    squeeze=False,
  )
  for j, arm in enumerate(arms):
    for i, branch in enumerate(branches):
      ax = axes[i][j]
      c = curves[arm].get(branch)
      if c is None:
        ax.axis("off")
        continue
      x = np.asarray(c["x"])
      mean, sd = np.asarray(c["mean"]), np.asarray(c["sd"])
      for layer in range(mean.shape[1]):
        ax.plot(x, mean[:, layer], label=f"layer {layer}")
        ax.fill_between(
          x,
          mean[:, layer] - sd[:, layer],
          mean[:, layer] + sd[:, layer],
          alpha=0.2,
        )
      ax.axhline(analysis.GATE_START, color="k", lw=0.6, ls=":")
      ax.set_title(f"{labels.get(arm, arm)}: {branch}")
      ax.set_xlabel("fraction of training")
      if j == 0:
        ax.set_ylabel("γ (layer mean)")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def write_all(out: Mapping, folder: str, labels: Mapping[str, str]) -> list:
  """Every figure the results allow; returns their paths."""
  os.makedirs(folder, exist_ok=True)
  paths = [
    differences(out, os.path.join(folder, "differences.png"), labels),
    sweep(out, os.path.join(folder, "shots.png"), labels),
  ]
  if out.get("gate_curves"):
    paths.append(gate(out, os.path.join(folder, "gate.png"), labels))
  return paths
