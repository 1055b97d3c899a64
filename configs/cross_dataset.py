r"""Cross-dataset transfer: ProMetaR trained on ImageNet, tested on 10 others.

Train on all 1000 ImageNet classes with 16 shots, then evaluate the
last-epoch prompts on ImageNet and on the full test sets (all classes) of
the 10 other base-to-new datasets.

  python launch.py --config configs/cross_dataset.py:seeds=1,2,3 \
    --workdir workdir/cross

Arguments: seed / seeds, shots, behaviour, runlocal.

Expected, ProMetaR (third-party listing; '?' = recalled, unverified):

  ImageNet 71.29 | Caltech101 93.74? | OxfordPets 90.59? |
  StanfordCars 65.83? | Flowers102 71.13 | Food101 86.39 |
  FGVCAircraft 24.78? | SUN397 67.41 | DTD 47.08 | EuroSAT 45.02 |
  UCF101 69.50 | target mean 66.15?
"""

from configs import common


def get_config(arg=None):
  return common.imagenet_transfer_config(
    arg, "cross_dataset", common.CROSS_DATASET_TARGETS
  )
