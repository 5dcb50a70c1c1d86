"""token_cross_entropy against a numpy reference, ties in the accuracy included."""

import numpy as np
import pytest

from train.objectives.losses import token_cross_entropy


def test_token_cross_entropy_matches_numpy_and_breaks_ties_like_argmax():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  logits[0, 0] = 0.0                        # all tied: argmax is index 0
  logits[0, 1, [2, 5]] = 9.0                # tied maximum: the first one counts
  targets = np.array([[0, 5, 1, 2, 3], [4, 4, 0, 6, 1]])
  targets[1, 2] = logits[1, 2].argmax()     # at least one right off the tie rows
  weights = np.array([[1, 1, 1, 0, 1], [1, 1, 1, 1, 0]], np.float32)
  out = token_cross_entropy(logits, targets, weights, z_loss=1e-2)

  log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  target_logit = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  ce = ((log_z - target_logit) * weights).sum()
  z = 1e-2 * (log_z ** 2 * weights).sum()
  correct = ((logits.argmax(-1) == targets) * weights).sum()
  assert float(out['cross_entropy'][0]) == pytest.approx(ce, rel=1e-5)
  assert float(out['z_loss'][0]) == pytest.approx(z, rel=1e-5)
  assert float(out['loss'][0]) == pytest.approx(ce + z, rel=1e-5)
  assert float(out['accuracy'][0]) == correct and correct >= 2   # rows [0,0] and [1,2]
  assert float(out['accuracy'][1]) == weights.sum()
