"""build_pipeline: batch format, resume exactness and configuration errors."""

import numpy as np
import pytest

from data import pipeline
from tests.data.conftest import host, make_config


@pytest.mark.parametrize('packing', ['greedy', 'first_fit'])
def test_lm_batch_is_next_token_within_segments(batch_sharding, packing):
  cfg = make_config(packing=packing)
  p = pipeline.build_pipeline(cfg, batch_sharding)
  b = host(next(p))
  assert set(b) == {'inputs', 'targets', 'segment_ids', 'positions', 'loss_mask'}
  assert all(v.shape == (8, 64) for v in b.values())
  assert b['loss_mask'].dtype == np.float32 and b['inputs'].dtype == np.int32
  seg, pos = b['segment_ids'], b['positions']
  same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
  # Inside a segment the next input is this position's target and positions count up by one.
  np.testing.assert_array_equal(b['inputs'][:, 1:][same], b['targets'][:, :-1][same])
  np.testing.assert_array_equal(pos[:, 1:][same], pos[:, :-1][same] + 1)
  starts = (seg > 0) & ~np.concatenate([np.zeros((8, 1), bool), same], axis=1)
  assert (pos[starts] == 0).all()
  assert (b['loss_mask'][seg == 0] == 0).all() and (b['loss_mask'][seg > 0] == 1).all()
  tok = p.tokenizer
  assert (b['inputs'][pos == 0] == tok.bos_id).any()  # documents start with bos
  assert p.stats()['packing_efficiency'] > 0.5


@pytest.mark.parametrize('packing', ['greedy', 'first_fit'])
def test_resume_from_state_yields_identical_batches(batch_sharding, packing):
  cfg = make_config(packing=packing, pack_window=16)
  p = pipeline.build_pipeline(cfg, batch_sharding)
  for _ in range(3):
    next(p)
  state = p.get_state()
  expected = [host(next(p)) for _ in range(4)]
  q = pipeline.build_pipeline(cfg, batch_sharding)
  q.set_state(state)
  for want in expected:
    got = host(next(q))
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  assert q.stats()['examples'] == p.stats()['examples']


def test_vocab_that_does_not_fit_the_model_is_rejected(batch_sharding):
  with pytest.raises(ValueError, match='model embeds only 256'):
    pipeline.build_pipeline(make_config(), batch_sharding, model_vocab_size=256)
  p = pipeline.build_pipeline(make_config(), batch_sharding, model_vocab_size=512)
  assert p.tokenizer.vocab_size <= 512
