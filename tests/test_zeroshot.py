"""Zero-shot features and accuracy, against the reference and hand values."""

import numpy as np

from prometar_jax import templates, zeroshot
from prometar_jax.models import clip as clip_lib


def test_teacher_features_equal_official(reference):
  arrays, _, hf_dir = reference
  clip = clip_lib.load(hf_dir)
  ids = arrays["input/zs_template_token_ids"]
  assert ids.shape[0] == len(templates.IMAGENET_TEMPLATES) == 60
  got = zeroshot.template_text_features(clip, ids, batch_size=100)
  np.testing.assert_allclose(
    got, arrays["input/zs_fixed_embeddings_normalized"], atol=1e-5
  )
  # Averaging normalized features instead (a plausible mistake) differs.
  per = clip_lib.normalize(arrays["input/zs_template_text_features"])
  wrong = clip_lib.normalize(per.mean(0))
  assert np.abs(wrong - got).max() > 1e-4


def test_class_prompts_and_templates():
  p = zeroshot.class_prompts(
    ["golden_retriever", "fox"], templates.IMAGENET_TEMPLATES
  )
  assert len(p) == 60 and p[0] == [
    "a photo of a golden retriever.",
    "a photo of a fox.",
  ]
  assert p[-1][1] == "itap of the fox."


def test_top1_accuracy_hand_values():
  scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
  labels = np.array([1, 1, 1, 0])
  assert zeroshot.top1_accuracy(scores, labels) == 75.0
  mask = np.array([True, True, False, False])
  assert zeroshot.top1_accuracy(scores, labels, mask) == 50.0
