r"""Other prompt learners, with and without ProMetaR, on any protocol.

`method` is a registered prompt learner (coop, vpt, ivlp, maple, zeroshot:
prometar_jax/prompt_learners/); `prometar=true` trains it with ProMetaR's
meta-regularization, `prometar=false` with plain cross-entropy (the
baseline). `protocol` picks base2new (default), domain_generalization or
cross_dataset; the other arguments are those of that protocol's config.

  python launch.py --workdir workdir/coop_prometar --config \
    configs/variants.py:method=coop,prometar=true,dataset=all,seeds=1,2,3
  python launch.py --workdir workdir/coop --config \
    configs/variants.py:method=coop,prometar=false,dataset=all,seeds=1,2,3
  python launch.py --config configs/variants.py:method=zeroshot,dataset=all \
    --workdir workdir/clip

Every learner keeps ProMetaR's recipe (batch 4, 10 epochs, SGD lr 0.0025),
so the two rows of a method differ only in the training scheme; the
original papers trained CoOp/VPT/MaPLe with their own recipes.

Expected (base-to-new averages, Base / New / HM): zero-shot CLIP 69.34 /
74.22 / 71.70; CoOp (own recipe) 82.69 / 63.22 / 71.66; MaPLe (own recipe)
82.28 / 75.14 / 78.55; IVLP (PromptSRC's 20-epoch run) 84.21 / 71.79 /
77.51; IVLP + ProMetaR 84.39 / 76.93 / 80.49. The paper's numbers for
CoOp/VPT + ProMetaR could not be retrieved (docs/training.md, "The
paper's numbers").
"""

from configs import base2new, common, cross_dataset, domain_generalization

_PROTOCOLS = {
  "base2new": base2new,
  "domain_generalization": domain_generalization,
  "cross_dataset": cross_dataset,
}


def get_config(arg=None):
  parsed = common.parse_arg(
    arg,
    method="ivlp",
    prometar=True,
    protocol="base2new",
    dataset=("eurosat",),
    seed=-1,
    seeds=(1,),
    shots=16,
    behaviour="released",
    runlocal=False,
  )
  if parsed.protocol not in _PROTOCOLS:
    raise ValueError(
      f"unknown protocol {parsed.protocol!r}; use one of {list(_PROTOCOLS)}"
    )
  rest = [
    f"seeds={','.join(str(s) for s in parsed.seeds)}",
    f"seed={parsed.seed}",
    f"shots={parsed.shots}",
    f"behaviour={parsed.behaviour}",
    f"runlocal={parsed.runlocal}",
  ]
  if parsed.protocol == "base2new":
    rest.append(f"dataset={','.join(parsed.dataset)}")
  config = _PROTOCOLS[parsed.protocol].get_config(",".join(rest))
  return common.apply_method(config, parsed.method, parsed.prometar)
