"""Dense decoder: layer layouts, packing isolation, head-count variants."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from model import ModelConfig, build_model
from model.decoder import unstack_layers
from tests.helpers import packed_batch

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64)


def _init(cfg, batch):
  model = build_model(cfg)
  params = meta.unbox(model.init(jax.random.key(0), batch['inputs'], batch['positions'],
                                 batch['segment_ids'])['params'])
  return model, params


def _logits(model, params, batch):
  return model.apply({'params': params}, batch['inputs'], batch['positions'],
                     batch['segment_ids'])


def test_scanned_and_unrolled_layers_agree():
  batch = packed_batch(2, 12, CFG.vocab_size)
  model, params = _init(CFG, batch)
  reference = _logits(model, params, batch)
  for remat in ('none', 'full', 'dots'):
    unrolled = build_model(dataclasses.replace(CFG, scan_layers=False, remat_policy=remat))
    out = _logits(unrolled, unstack_layers(params, CFG.num_layers), batch)
    np.testing.assert_allclose(out, reference, atol=1e-5, rtol=1e-5)


def test_packed_segments_do_not_see_each_other():
  batch = packed_batch(1, 12, CFG.vocab_size)
  model, params = _init(CFG, batch)
  packed = _logits(model, params, batch)
  seg = np.asarray(batch['segment_ids'][0])
  for s in (1, 2):
    idx = np.nonzero(seg == s)[0]
    alone = {k: v[:, idx] for k, v in batch.items()}
    np.testing.assert_allclose(_logits(model, params, alone)[0], packed[0, idx], atol=1e-5)
  # Changing the first document must leave the second one's logits untouched.
  changed = dict(batch, inputs=batch['inputs'].at[0, 0].set(7))
  second = seg == 2
  np.testing.assert_allclose(_logits(model, params, changed)[0][second], packed[0][second],
                             atol=1e-6)
  assert not np.allclose(_logits(model, params, changed)[0][0], packed[0][0])


def test_gqa_equals_mha_with_repeated_kv_heads():
  batch = packed_batch(2, 8, CFG.vocab_size)
  model, params = _init(CFG, batch)
  mha_cfg = dataclasses.replace(CFG, num_kv_heads=CFG.num_heads)
  rep = CFG.num_heads // CFG.num_kv_heads
  attn = dict(params['layers']['attn'])
  for name in ('key', 'value'):
    attn[name] = {'kernel': jnp.repeat(attn[name]['kernel'], rep, axis=2)}
  mha_params = dict(params, layers=dict(params['layers'], attn=attn))
  np.testing.assert_allclose(_logits(build_model(mha_cfg), mha_params, batch),
                             _logits(model, params, batch), atol=1e-5)


def test_tied_embeddings_have_no_lm_head_and_bf16_compute_runs():
  batch = packed_batch(2, 8, CFG.vocab_size)
  cfg = dataclasses.replace(CFG, tie_embeddings=True, dtype='bfloat16')
  model, params = _init(cfg, batch)
  assert 'lm_head' not in params
  assert params['embed']['embedding'].dtype == jnp.float32
  logits = _logits(model, params, batch)
  assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())
