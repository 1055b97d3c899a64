"""Benchmark of the ProMetaR step at ViT-B/16 shapes, beside the official one.

Times the project's jit-compiled step (random ViT-B/16 weights, batch 4,
IVLP prompts 4+4 at depth 9, second order, the released behaviour) at several
class counts, with class prompts of realistic token lengths, in fp32 and bf16.
Reports compile time, the median step time, peak memory (process RSS on CPU,
device memory statistics on a GPU), evaluation images/s, and the step's
achieved FLOP/s (model FLOPs counted analytically) as a fraction of a large
matmul timed in the same run.

The official PyTorch step is timed in the same run, class count by class
count just before the project's, when these are set (machines differ by up
to 2x, so only a same-run ratio means something):

  PROMETAR_OFFICIAL_SRC      an extracted work tree of mlvlab/ProMetaR
                             (commit c907bdb; never committed here)
  OFFICIAL_PYTHON            a Python with the official harness's
                             requirements (torch 2.13 CPU, transformers 5)
  PROMETAR_OFFICIAL_HARNESS  the folder of the harness's time_step.py
                             (default: official_step/ of the shared folder
                             beside the checkout)

Without them the ratios are against figures recorded on another machine
(OFFICIAL below), and the table says so.

Each (classes, dtype) point runs in a fresh subprocess so that peak RSS is
that point's own.

  python benchmarks/step.py                          # 10, 40, 500 classes
  python benchmarks/step.py --classes 10,40 --dtypes float32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

# The official step recorded on another 2-core machine (fp32, math
# attention): only for runs without the official step timed beside ours.
OFFICIAL = {
  "step_s": {10: 12.0, 20: 15.7, 40: 23.3},
  "peak_gib": {10: 7.9, 20: 10.6, 40: 14.8},
  "image_forward_4_s": 0.59,
}

BATCH, DEPTH, N_CTX = 4, 9, 4
SHARED = 1 + N_CTX  # SOT and the text context: computed once for all classes


def realistic_prompt_ids(n_classes: int, seed: int = 0, length: int = 77):
  """Ids shaped like "a photo of a {class name}." for real class names.

  Lengths follow the spread of the 11 datasets' names: mostly 1-4 name
  tokens, a tail up to ~19 (FGVC variants, UCF actions, SUN scenes), so the
  longest prompt is about 25 tokens including SOT, ".", EOT.
  """
  import numpy as np

  rng = np.random.default_rng(seed)
  name_lens = rng.choice(
    [1, 2, 3, 4, 5, 6, 8, 10, 13, 19],
    size=n_classes,
    p=[0.3, 0.25, 0.15, 0.1, 0.06, 0.05, 0.04, 0.02, 0.02, 0.01],
  )
  name_lens[0] = 19  # at least one long name, as in every real dataset
  ids = np.full((n_classes, length), 49407, np.int32)
  for c, k in enumerate(name_lens):
    body = [320, 1125, 539, 320] + list(rng.integers(300, 49000, k)) + [269]
    ids[c, 0] = 49406
    ids[c, 1 : 1 + len(body)] = body
    ids[c, 1 + len(body)] = 49407
  return ids


def tower_flops(width, mlp, layers, tokens, seq):
  """Forward matmul FLOPs of `tokens` tokens in sequences of length `seq`."""
  per_token_layer = 2 * (4 * width * width + 2 * width * mlp + 2 * seq * width)
  return per_token_layer * layers * tokens


def text_rows(groups):
  """Text rows a tower pass computes: the shared prefix once, then each
  group's class rows (all groups in one pass)."""
  return SHARED + sum(c * (n - SHARED) for c, n in groups)


def text_groups(token_ids):
  """[(classes, length)] of class prompts, grouped or not."""
  if isinstance(token_ids, dict):
    return [tuple(b.shape) for b in token_ids["buckets"]]
  return [tuple(token_ids.shape)]


def step_flops(groups):
  """Model FLOPs of one step, counted from its passes.

  Gradients are taken w.r.t. prompts only, so a backward pass costs one
  forward (input gradients, no weight gradients). Per step: the frozen image
  features (1 plain image forward); stage 1 (1 forward + 2 backward = 3
  passes); the inner step (3 passes and their reverse: 6) on B - 1 images
  (`meta_step.support_slots`) and all classes; the query loss (forward and
  backward: 2 passes). Images: 4 of 201 tokens; text: the class prompts in
  `groups` of (classes, length).
  """
  vis_tokens = 1 + 14 * 14 + N_CTX
  f_v = tower_flops(768, 3072, 12, BATCH * vis_tokens, vis_tokens)
  f_v += 2 * BATCH * 196 * (3 * 16 * 16) * 768  # patch embedding
  f_t = tower_flops(512, 2048, 12, SHARED, SHARED) + sum(
    tower_flops(512, 2048, 12, c * (n - SHARED), n) for c, n in groups
  )
  inner_v = f_v * (BATCH - 1) / BATCH
  return f_v + 3 * (f_v + f_t) + 6 * (inner_v + f_t) + 2 * (f_v + f_t)


def matmul_flops_per_s(dtype, n=4096, reps=5):
  import jax
  import jax.numpy as jnp

  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n**3 / min(times)


def peak_memory_gib():
  import jax

  dev = jax.devices()[0]
  if dev.platform != "cpu":
    stats = dev.memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2**30
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def step_inputs(n_classes, token_ids, dtype_name="float32", remat="matmuls"):
  """(frozen, spec, state, batch) of the benchmarked step.

  Random ViT-B/16 weights, IVLP 4+4 prompts at depth 9, batch 4 with two
  classes among four images (the meta part runs every step).
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  from prometar_jax import meta_step
  from prometar_jax import prompt_learners as pl
  from prometar_jax.models import clip as clip_lib

  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name]
  cfg = clip_lib.VIT_B16
  params = clip_lib.init_params(cfg, jax.random.key(0))
  clip = clip_lib.CLIP(cfg, params, dtype=dtype, remat=remat)
  rng = np.random.default_rng(0)
  teacher = rng.normal(size=(n_classes, 512)).astype(np.float32)
  frozen = meta_step.Frozen(
    clip,
    {
      "token_ids": jax.tree.map(jnp.asarray, token_ids),
      "teacher": clip_lib.normalize(jnp.asarray(teacher)),
      "class_mask": jnp.ones((n_classes,), bool),
    },
  )
  spec = meta_step.StepSpec(
    pl.PromptConfig(kind="ivlp", depth_text=DEPTH, depth_vision=DEPTH),
    meta_step.MetaConfig(),
  )
  prompts = {
    "text": 0.02 * jax.random.normal(jax.random.key(1), (DEPTH, N_CTX, 512)),
    "vision": 0.02 * jax.random.normal(jax.random.key(2), (DEPTH, N_CTX, 768)),
  }
  # The released schedule at 100 steps an epoch: the lr's value does not
  # change the work.
  state = meta_step.init_state(
    jax.random.key(3), prompts, spec, steps_per_epoch=100
  )
  images = jnp.asarray(rng.normal(size=(BATCH, 224, 224, 3)), jnp.float32)
  labels = jnp.asarray([0, 1, 0, min(2, n_classes - 1)], jnp.int32)
  batch = {"image": images, "label": labels}
  return frozen, spec, state, batch


def run_point(n_classes, dtype_name, steps, remat, eval_batch, text_buckets):
  """One measurement in this process; returns a dict of figures."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from prometar_jax import meta_step
  from prometar_jax import prompt_learners as pl

  ids = pl.bucket_token_ids(
    realistic_prompt_ids(n_classes), text_buckets, shared_rows=SHARED
  )
  groups = text_groups(ids)
  frozen, spec, state, batch = step_inputs(n_classes, ids, dtype_name, remat)
  clip = frozen.clip
  step = meta_step.make_train_step(spec)
  t0 = time.perf_counter()
  compiled = step.lower(state, frozen, batch).compile()
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(steps + 1):  # the first call pays transfers, not timed
    t = time.perf_counter()
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t)
  loss = float(metrics["loss_meta"])
  assert np.isfinite(loss) and float(metrics["meta_valid"]) == 1.0

  # Evaluation: prompted image features of a batch, images/s.
  enc = jax.jit(
    lambda p, x: clip.encode_image(x, pl.tower_prompts(p, spec.prompt)[1])
  )
  x = jnp.zeros((eval_batch, 224, 224, 3), jnp.float32)
  enc(state.prompts, x).block_until_ready()
  t = time.perf_counter()
  reps = 2
  for _ in range(reps):
    enc(state.prompts, x).block_until_ready()
  eval_ips = reps * eval_batch / (time.perf_counter() - t)

  timed = times[1:] or times  # --steps 0: one call (memory-only runs)
  step_s = statistics.median(timed)
  flops = step_flops(groups)
  peak = matmul_flops_per_s(clip.dtype)
  return {
    "classes": n_classes,
    "dtype": dtype_name,
    "text_len": max(n for _, n in groups),
    "text_groups": groups,
    "text_positions": sum(c * n for c, n in groups),
    "text_rows": text_rows(groups),
    "step_s_median": step_s,
    "step_s_all": timed,
    "compile_s": compile_s,
    "peak_rss_gib": peak_memory_gib(),
    "eval_images_per_s": eval_ips,
    "model_tflop_per_step": flops / 1e12,
    "achieved_tflop_s": flops / step_s / 1e12,
    "matmul_tflop_s": peak / 1e12,
    "fraction_of_matmul": flops / step_s / peak,
    "platform": jax.devices()[0].platform,
    "device": str(jax.devices()[0].device_kind),
    "remat": remat,
  }


def _default_harness() -> str:
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return os.path.join(os.path.dirname(repo), "shared", "official_step")


def official_configured() -> bool:
  return bool(
    os.environ.get("PROMETAR_OFFICIAL_SRC")
    and os.environ.get("OFFICIAL_PYTHON")
  )


def time_official(n_classes: int, reps: int) -> dict:
  """The official step at `n_classes` (fp32, CPU), timed now by its harness.

  Returns {"step_s_median", "step_s_all", "peak_rss_gib"} or {"error": ...}.
  """
  import tempfile

  harness = os.environ.get("PROMETAR_OFFICIAL_HARNESS", _default_harness())
  script = os.path.join(harness, "time_step.py")
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "official.json")
    cmd = [
      os.environ["OFFICIAL_PYTHON"],
      script,
      "--presets",
      "full",
      "--full-n-cls",
      str(n_classes),
      "--reps",
      str(reps),
      "--out",
      out,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.exists(out):
      return {"error": (proc.stdout + proc.stderr)[-2000:]}
    with open(out) as f:
      r = json.load(f)["results"][f"full_ncls{n_classes}"]
  if "forward_backward" not in r:
    return {"error": str(r.get("error")) + r.get("log_tail", "")[-1500:]}
  fb = r["forward_backward"]
  return {
    "step_s_median": fb["median_s"],
    "step_s_all": fb["all_s"],
    "peak_rss_gib": r["peak_rss_process_mib (ru_maxrss)"] / 1024,
  }


def print_table(rows):
  head = (
    f"{'classes':>7} {'dtype':>8} {'text rows':>9} {'step s':>8} {'x official':>10} "
    f"{'compile s':>9} {'peak GiB':>8} {'mem ratio':>9} {'eval img/s':>10} "
    f"{'TFLOP/s':>8} {'of matmul':>9}"
  )
  print(head)
  print("-" * len(head))
  same_run = any("official_step_s" in r for r in rows)
  for r in rows:
    if same_run:
      off = r.get("official_step_s")
      off_mem = r.get("official_peak_rss_gib")
    else:
      off = OFFICIAL["step_s"].get(r["classes"])
      off_mem = OFFICIAL["peak_gib"].get(r["classes"])
    speed = f"{off / r['step_s_median']:.2f}x" if off else "n/a"
    mem = f"{r['peak_rss_gib'] / off_mem:.2f}" if off_mem else "n/a"
    print(
      f"{r['classes']:>7} {r['dtype']:>8} {r['text_rows']:>9} "
      f"{r['step_s_median']:>8.2f} {speed:>10} {r['compile_s']:>9.1f} "
      f"{r['peak_rss_gib']:>8.2f} {mem:>9} {r['eval_images_per_s']:>10.1f} "
      f"{r['achieved_tflop_s']:>8.3f} {r['fraction_of_matmul']:>9.2f}"
    )
  if same_run:
    print(
      "x official: the official PyTorch step (fp32, CPU) timed in this run, "
      "just before ours at the same class count: "
      + ", ".join(
        f"{r['official_step_s']:.2f} s @{r['classes']}"
        for r in rows
        if "official_step_s" in r
      )
      + "."
    )
    return
  print(
    "x official: against figures recorded on ANOTHER machine (machines "
    "differ by up to 2x; set PROMETAR_OFFICIAL_SRC and OFFICIAL_PYTHON to "
    "time the official step in this run): step 12.0 s @10, 15.7 s @20, "
    "23.3 s @40 classes; peak 7.9 / 10.6 / 14.8 GiB; 500 classes does not "
    "fit in 24 GiB."
  )


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--classes", default="10,40,500")
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--eval_batch", type=int, default=16)
  ap.add_argument(
    "--remat",
    default="auto",
    choices=["auto", "none", "matmuls", "full"],
    help='model.remat; auto: "full" from 100 classes on (memory), '
    '"matmuls" below',
  )
  ap.add_argument(
    "--text_buckets",
    type=int,
    default=4,
    help="group class prompts by length (1: one trim for all classes)",
  )
  ap.add_argument(
    "--official_reps",
    type=int,
    default=3,
    help="timed official steps per class count (when configured)",
  )
  ap.add_argument("--json", default=None, help="write the figures here")
  ap.add_argument("--point", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()

  if args.point:  # child process: one measurement, JSON on the last line
    n, dtype, remat = args.point.split(":")
    # benchmarks/alternate.py passes 0 / 1 to every revision it runs.
    remat = {"0": "matmuls", "1": "full"}.get(remat, remat)
    row = run_point(
      int(n),
      dtype,
      args.steps,
      remat,
      args.eval_batch,
      args.text_buckets,
    )
    print(json.dumps(row))
    return

  rows = []
  official = official_configured()
  if not official:
    print(
      "PROMETAR_OFFICIAL_SRC / OFFICIAL_PYTHON not set: the official step is "
      "not timed in this run; ratios are against another machine's figures",
      flush=True,
    )
  for n in [int(c) for c in args.classes.split(",")]:
    off = {}
    if official and n <= 40:  # more classes do not fit in 24 GiB
      off = time_official(n, args.official_reps)
      if "error" in off:
        print(f"official step at {n} classes failed:\n{off['error']}")
      else:
        print(f"official step at {n} classes: {off}", flush=True)
    for dtype in args.dtypes.split(","):
      remat = args.remat
      if remat == "auto":
        remat = "full" if n >= 100 else "matmuls"
      cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--point",
        f"{n}:{dtype}:{remat}",
        "--steps",
        str(args.steps),
        "--eval_batch",
        str(args.eval_batch),
        "--text_buckets",
        str(args.text_buckets),
      ]
      out = subprocess.run(cmd, capture_output=True, text=True)
      if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        print(f"the {n}-class {dtype} point failed", file=sys.stderr)
        continue
      row = json.loads(out.stdout.strip().splitlines()[-1])
      if "step_s_median" in off:
        row["official_step_s"] = off["step_s_median"]
        row["official_step_s_all"] = off["step_s_all"]
        row["official_peak_rss_gib"] = off["peak_rss_gib"]
        row["speedup"] = off["step_s_median"] / row["step_s_median"]
      rows.append(row)
      print(json.dumps(row), flush=True)
  print()
  print_table(rows)
  if args.json and rows:
    first = rows[0]
    summary = {
      "step_s_median": first["step_s_median"],
      "peak_rss_gib": first["peak_rss_gib"],
      "compile_s": first["compile_s"],
      "official_same_run": official,
      "speedup": {
        str(r["classes"]): r["speedup"] for r in rows if "speedup" in r
      },
      "points": rows,
    }
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=2)


if __name__ == "__main__":
  main()
