"""Encoder-only MLM model: bidirectional, packed rows stay apart, sharded = one device."""

import jax
import numpy as np
import pytest
from flax.core import meta

from model import ModelConfig, build_model
from tests.helpers import packed_batch, partitioner, tiny_config
from tests.model.test_t5 import assert_same_loss_and_grads, loss_and_grads
from train.objectives import build_objective

CFG = ModelConfig(family='encoder', vocab_size=64, d_model=32, num_layers=2, num_heads=4,
                  num_kv_heads=4, head_dim=8, mlp_dim=64, position_embedding='relative',
                  scale_attention=False, relative_buckets=8, relative_max_distance=16)


def _logits(model, params, batch):
  return model.apply({'params': params}, batch['inputs'], batch['positions'],
                     batch['segment_ids'])


def test_encoder_is_bidirectional_within_a_segment_only():
  batch = packed_batch(1, 12, CFG.vocab_size)
  model = build_model(CFG)
  params = meta.unbox(model.init(jax.random.key(0), batch['inputs'], batch['positions'],
                                 batch['segment_ids'])['params'])
  assert set(params) == {'embed', 'encoder', 'lm_head'}
  base = _logits(model, params, batch)
  seg = np.asarray(batch['segment_ids'][0])
  last_of_first = int(np.nonzero(seg == 1)[0][-1])
  out = _logits(model, params, dict(batch, inputs=batch['inputs'].at[0, last_of_first].set(5)))
  assert not np.allclose(out[0, 0], base[0, 0])            # an earlier token sees a later one
  np.testing.assert_allclose(out[0][seg == 2], base[0][seg == 2], atol=1e-6)  # not another doc


@pytest.mark.parametrize('axes', [dict(data=2, fsdp=2, tensor=2), dict(fsdp=4)], ids=str)
def test_sharded_mlm_equals_single_device(axes):
  config = tiny_config(family='encoder', position_embedding='relative', scale_attention=False)
  config.objective.name = config.data.task = 'mlm'
  objective = build_objective('mlm', build_model(ModelConfig.from_dict(config.model.to_dict())),
                              config)
  params, _ = partitioner().init(objective.init_fn, jax.random.key(0))
  batch = packed_batch(8, config.data.seq_len, config.model.vocab_size)
  batch['loss_mask'] = batch['loss_mask'] * (np.arange(config.data.seq_len) % 3 == 0)
  assert_same_loss_and_grads(loss_and_grads(partitioner(**axes), objective, params, batch),
                             loss_and_grads(partitioner(), objective, params, batch))
