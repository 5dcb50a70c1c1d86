"""T5 encoder–decoder: relative-position buckets, sharded = one device, cached decoding =
full recomputation, packed examples stay apart, prefix-LM split."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import ModelConfig, build_model
from model.decoding import t5_generate
from model.relative_position import relative_position_bucket
from tests.helpers import partitioner, tiny_config
from train.objectives import build_objective
from train.objectives.span import split_prefix

CFG = ModelConfig(family='t5', vocab_size=64, d_model=32, num_layers=2, num_decoder_layers=3,
                  num_heads=8, num_kv_heads=4, head_dim=8, mlp_dim=64, activation='geglu',
                  position_embedding='relative', scale_attention=False, relative_buckets=8,
                  relative_max_distance=16)


def seq2seq_batch(rows: int, enc_len: int, dec_len: int, vocab: int, seed: int = 0) -> dict:
  """Random 'span_corruption' batch; every row packs two examples and ends in padding."""
  rng = np.random.RandomState(seed)
  out = {}
  for prefix, n in (('encoder_', enc_len), ('decoder_', dec_len)):
    cut, end = n // 3, n - 2
    seg = np.zeros((rows, n), np.int32)
    seg[:, :cut], seg[:, cut:end] = 1, 2
    pos = np.where(seg == 2, np.arange(n) - cut, np.arange(n)) * (seg > 0)
    out.update({prefix + 'inputs': rng.randint(3, vocab, (rows, n)).astype(np.int32),
                prefix + 'segment_ids': seg, prefix + 'positions': pos.astype(np.int32)})
  out['decoder_targets'] = rng.randint(3, vocab, (rows, dec_len)).astype(np.int32)
  out['decoder_loss_mask'] = (out['decoder_segment_ids'] > 0).astype(np.float32)
  return {k: jnp.asarray(v) for k, v in out.items()}


def _logits(model, params, batch):
  # jit: eager op-by-op execution of the whole model is several times slower on CPU.
  return jax.jit(model.apply)({'params': params}, *(batch[k] for k in (
      'encoder_inputs', 'encoder_positions', 'encoder_segment_ids', 'decoder_inputs',
      'decoder_positions', 'decoder_segment_ids')))


def _params(model, batch):
  from flax.core import meta
  return meta.unbox(jax.jit(model.init)(jax.random.key(0), *(batch[k] for k in (
      'encoder_inputs', 'encoder_positions', 'encoder_segment_ids', 'decoder_inputs',
      'decoder_positions', 'decoder_segment_ids')))['params'])


def test_relative_position_buckets_match_the_t5_formula():
  bucket = lambda rel, bidirectional: int(relative_position_bucket(
      jnp.asarray(rel), bidirectional=bidirectional, num_buckets=32, max_distance=128))
  # rel = key - query. Bidirectional: 16 buckets per direction, 8 exact, then log-spaced to 128;
  # e.g. distance 16 -> 8 + int(log(16/8) / log(128/8) * 8) = 10; keys after the query + 16.
  expected = {0: 0, -1: 1, -7: 7, -8: 8, -16: 10, -127: 15, -500: 15, 1: 17, 16: 26, 500: 31}
  assert {r: bucket(r, True) for r in expected} == expected
  # Causal: future keys all in bucket 0; 16 exact, then 16 + int(log(d/16) / log(8) * 16).
  expected = {5: 0, 0: 0, -3: 3, -15: 15, -20: 17, -64: 26, -128: 31, -1000: 31}
  assert {r: bucket(r, False) for r in expected} == expected


@pytest.fixture(scope='module')
def sharding_setup():
  config = tiny_config(family='t5', num_decoder_layers=3, activation='geglu',
                       position_embedding='relative', scale_attention=False)
  config.objective.name = config.data.task = 'span_corruption'
  config.data.update(seq_len=16, target_len=8)
  objective = build_objective('span_corruption', build_model(
      ModelConfig.from_dict(config.model.to_dict())), config)
  params, _ = partitioner().init(objective.init_fn, jax.random.key(0))
  batch = seq2seq_batch(8, 16, 8, config.model.vocab_size)
  return objective, params, batch, loss_and_grads(partitioner(), objective, params, batch)


def loss_and_grads(part, objective, params, batch):
  """Loss sum and grads under `part`'s mesh, parameters placed by the rules."""
  _, shardings = part.abstract(objective.init_fn, jax.random.key(0))
  fn = lambda p, b: jax.value_and_grad(
      lambda p: objective.loss_fn(p, b, jax.random.key(1), train=True)['loss'][0])(p)
  return part.jit(fn, in_shardings=(shardings, part.batch_sharding),
                  out_shardings=(part.replicated, shardings))(
                      jax.device_put(params, shardings), jax.device_put(batch, part.batch_sharding))


def assert_same_loss_and_grads(a, b):
  np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
  for g, r in zip(jax.tree.leaves(a[1]), jax.tree.leaves(b[1])):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * float(np.abs(r).max()))


@pytest.mark.parametrize('axes', [dict(data=2, fsdp=2, tensor=2), dict(tensor=4, data=2)],
                         ids=str)
def test_sharded_t5_equals_single_device(sharding_setup, axes):
  objective, params, batch, reference = sharding_setup
  assert_same_loss_and_grads(loss_and_grads(partitioner(**axes), objective, params, batch),
                             reference)


@pytest.mark.parametrize('temperature', [0.0, 1.0])
def test_cached_decoding_equals_full_recomputation(temperature):
  batch = seq2seq_batch(2, 12, 7, CFG.vocab_size)
  model = build_model(CFG)
  params = _params(model, batch)
  enc = {k: batch[k][:, :9] for k in ('encoder_inputs', 'encoder_positions')}
  enc_seg = jnp.asarray([[1] * 9, [1] * 6 + [0] * 3], jnp.int32)   # second row padded
  steps = 7
  generate = jax.jit(lambda p, r: t5_generate(
      model, p, enc['encoder_inputs'], jnp.broadcast_to(jnp.arange(9), (2, 9)), enc_seg, r,
      steps=steps, start_id=1, temperature=temperature))
  tokens, logprobs = generate(params, jax.random.key(3))
  # Teacher-forcing the generated tokens through the uncached model gives the same
  # log-probabilities at every step (and greedy tokens are its argmax).
  full = dict(encoder_inputs=enc['encoder_inputs'],
              encoder_positions=jnp.broadcast_to(jnp.arange(9), (2, 9)),
              encoder_segment_ids=enc_seg,
              decoder_inputs=jnp.concatenate([jnp.ones((2, 1), jnp.int32), tokens[:, :-1]], 1),
              decoder_positions=jnp.broadcast_to(jnp.arange(steps), (2, steps)),
              decoder_segment_ids=jnp.ones((2, steps), jnp.int32))
  logits = _logits(model, params, full)
  expected = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(logprobs, expected, atol=1e-5)
  if temperature == 0.0:
    np.testing.assert_array_equal(tokens, jnp.argmax(logits, -1))
  else:   # sampling really samples: not the greedy sequence everywhere
    assert not np.array_equal(tokens, jnp.argmax(logits, -1))


def test_packed_examples_do_not_see_each_other_and_v1_0_options_run():
  batch = seq2seq_batch(1, 12, 9, CFG.vocab_size)
  model = build_model(CFG)
  params = _params(model, batch)
  packed = _logits(model, params, batch)
  second = np.asarray(batch['decoder_segment_ids'][0]) == 2
  changed = dict(batch, encoder_inputs=batch['encoder_inputs'].at[0, 0].set(5),
                 decoder_inputs=batch['decoder_inputs'].at[0, 0].set(5))
  out = _logits(model, params, changed)
  np.testing.assert_allclose(out[0][second], packed[0][second], atol=1e-6)
  assert not np.allclose(out[0][~second], packed[0][~second])
  # T5 v1.0: ReLU MLP and tied embedding (no lm_head); rotary positions also run.
  for cfg in (dataclasses.replace(CFG, activation='relu', tie_embeddings=True),
              dataclasses.replace(CFG, position_embedding='rope', scale_attention=True)):
    m = build_model(cfg)
    p = _params(m, batch)
    assert ('lm_head' in p['decoder']) != cfg.tie_embeddings
    assert bool(jnp.isfinite(_logits(m, p, batch)).all())


def test_prefix_split_cuts_every_segment_once():
  seg = jnp.asarray([[1, 1, 1, 1, 1, 2, 2, 2, 0, 0]], jnp.int32)
  pos = jnp.asarray([[0, 1, 2, 3, 4, 0, 1, 2, 0, 0]], jnp.int32)
  batch = dict(inputs=jnp.arange(10)[None], targets=jnp.arange(1, 11)[None], segment_ids=seg,
               positions=pos, loss_mask=(seg > 0).astype(jnp.float32))
  for i in range(5):
    out = split_prefix(batch, jax.random.key(i))
    enc, dec = np.asarray(out['encoder_segment_ids'][0]), np.asarray(out['decoder_segment_ids'][0])
    for s in (1, 2):
      e, d = np.nonzero(enc == s)[0], np.nonzero(dec == s)[0]
      # A non-empty prefix; the decoder starts at its last token and runs to the segment's end.
      assert len(e) >= 1 and d[0] == e[-1] and d[-1] == np.nonzero(seg[0] == s)[0][-1]
      assert np.asarray(out['decoder_positions'][0])[d].tolist() == list(range(len(d)))
    assert float(out['decoder_loss_mask'].sum()) == float((dec > 0).sum())
