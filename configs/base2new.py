r"""Base-to-new generalization: ProMetaR on IVLP, released hyper-parameters.

Train on the base classes (first half of the labels) of a dataset with 16
shots, evaluate the last-epoch prompts on the base test set and, with the
new class names, on the new test set; HM = 2BN/(B+N).

One dataset, one seed:

  python launch.py --config configs/base2new.py:dataset=eurosat,seed=1 \
    --workdir workdir/base2new

The paper's table (11 datasets x 3 seeds; `results.md` in the workdir):

  python launch.py --config configs/base2new.py:dataset=all,seeds=1,2,3 \
    --workdir workdir/base2new

Arguments: dataset (a name, several, or `all`), seed / seeds, shots,
behaviour (`released` | `paper`), runlocal (1 epoch, 1 shot, 200 test
images: a smoke run, not a result). Overrides: `--config.optim.lr=0.002`.

Hyper-parameters (official vit_b16_c2_ep10_batch4_4+4ctx.yaml): ViT-B/16,
batch 4, 10 epochs, SGD lr 0.0025 cosine with 1 constant warm-up epoch at
1e-5 stepped per epoch, momentum 0.9, weight decay 5e-4, IVLP depth 9, 4
text + 4 vision tokens initialised from "a photo of a"; meta step: inner
lr 5e-4, loss ratio 5e-4, mixup Beta(0.5, 0.5), gradnet lr 1e-6. The batch
size is part of the method (support/query split of 4 images): keep it at 4
whatever the device count.

Expected, ProMetaR paper Table 1 (Base / New / HM, mean of seeds 1-3):

  ImageNet       77.76 / 70.75 / 74.09    Food101        90.80 / 91.89 / 91.34
  Caltech101     98.11 / 94.29 / 96.16    FGVCAircraft   42.02 / 38.63 / 40.25
  OxfordPets     95.57 / 97.46 / 96.51    SUN397         82.70 / 79.02 / 80.82
  StanfordCars   78.32 / 75.18 / 76.72    DTD            83.02 / 64.05 / 72.31
  Flowers102     98.13 / 77.66 / 86.70    EuroSAT        94.94 / 77.44 / 85.30
  UCF101         86.97 / 79.84 / 83.25
  Average        84.39 / 76.93 / 80.49  (HM of the averaged Base and New)
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(
    arg,
    dataset=("eurosat",),
    seed=-1,
    seeds=(1,),
    shots=16,
    behaviour="released",
    runlocal=False,
  )
  config = common.get_base_config()
  config.protocol = "base2new"
  config.data.datasets = common.expand_datasets(arg.dataset)
  config.seeds = (arg.seed,) if arg.seed >= 0 else tuple(arg.seeds)
  config.data.num_shots = arg.shots
  common.apply_behaviour(config, arg.behaviour)
  if arg.runlocal:
    common.apply_runlocal(config)
  return config
