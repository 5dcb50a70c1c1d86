"""T5 encoder–decoder: relative-position buckets, query init, sharded = one device, cached
decoding = full recomputation, eval decoding of packed examples, packed examples stay apart,
prefix-LM split.

Weights are random draws from the parameter shapes (no init is compiled) and each model's
jitted apply is shared, so the file compiles a handful of programs.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import ModelConfig, build_model
from model.attention import Attention
from model.decoding import t5_generate
from model.hf import abstract_params
from model.relative_position import relative_position_bucket
from tests.helpers import partitioner, tiny_config
from train.objectives import build_objective
from train.objectives.span import decode_scores, greedy_decode_scores, split_prefix

CFG = ModelConfig(family='t5', vocab_size=64, d_model=32, num_layers=2, num_decoder_layers=3,
                  num_heads=8, num_kv_heads=4, head_dim=8, mlp_dim=64, activation='geglu',
                  position_embedding='relative', scale_attention=False, relative_buckets=8,
                  relative_max_distance=16)
# The other options: T5 v1.0's ReLU MLP and tied, rescaled logits; rotary positions.
V1_ROPE = dataclasses.replace(CFG, activation='relu', tie_embeddings=True,
                              position_embedding='rope', scale_attention=True)
MODEL_KEYS = ('encoder_inputs', 'encoder_positions', 'encoder_segment_ids', 'decoder_inputs',
              'decoder_positions', 'decoder_segment_ids')
ENC, STEPS = 9, 7   # encoder length and decoded tokens of the decoding tests


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


def random_params(shapes, seed: int = 0):
  """Normal(0, 0.3) draws in the shapes of `shapes` (ShapeDtypeStructs)."""
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), shapes)


@pytest.fixture(scope='module')
def models():
  """cfg -> (model, random params, jitted apply on a batch's MODEL_KEYS)."""
  out = {}
  for cfg in (CFG, V1_ROPE):
    model = build_model(cfg)
    apply = jax.jit(lambda p, b, model=model: model.apply(
        {'params': p}, *(b[k] for k in MODEL_KEYS)))
    out[cfg] = (model, random_params(abstract_params(cfg)), apply)
  return out


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


def test_unscaled_attention_folds_the_scaling_into_the_query_init():
  d, hd = 128, 32
  cfg = dataclasses.replace(CFG, d_model=d, num_heads=4, num_kv_heads=4, head_dim=hd)
  x = jnp.zeros((1, 1, d))
  scales = (None, 1.0)   # None: logits / sqrt(head_dim); 1.0: T5's unscaled logits
  inits = jax.jit(lambda key: [nn.meta.unbox(Attention(cfg, use_rope=False, scale=s).init(
      key, x, x, None)['params']) for s in scales])(jax.random.key(0))
  std = {s: {k: float(np.std(v['kernel'])) for k, v in p.items()} for s, p in zip(scales, inits)}
  # Mesh TF / T5X: q (d_model * head_dim)^-0.5 when unscaled; k, v, out: fan-in^-0.5.
  np.testing.assert_allclose(std[1.0]['query'], (d * hd) ** -0.5, rtol=0.03)
  np.testing.assert_allclose(std[None]['query'], d ** -0.5, rtol=0.03)
  for scale in (None, 1.0):
    np.testing.assert_allclose([std[scale][k] for k in ('key', 'value', 'out')],
                               [d ** -0.5] * 3, rtol=0.03)


@pytest.fixture(scope='module')
def sharding_setup():
  config = tiny_config(family='t5', num_decoder_layers=3, activation='geglu',
                       position_embedding='relative', scale_attention=False)
  config.objective.name = config.data.task = 'span_corruption'
  config.data.update(seq_len=16, target_len=8)
  objective = build_objective('span_corruption', build_model(
      ModelConfig.from_dict(config.model.to_dict())), config)
  params = random_params(partitioner().abstract(objective.init_fn, jax.random.key(0))[0])
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


@pytest.fixture(scope='module')
def generated(models):
  """Encoder rows (the second padded), and t5_generate's greedy and sampled (tokens,
  log-probs) for them, from one compiled program."""
  model, params, _ = models[CFG]
  enc = dict(encoder_inputs=seq2seq_batch(2, ENC, STEPS, CFG.vocab_size)['encoder_inputs'],
             encoder_positions=jnp.broadcast_to(jnp.arange(ENC), (2, ENC)),
             encoder_segment_ids=jnp.asarray([[1] * ENC, [1] * 6 + [0] * 3], jnp.int32))
  generate = jax.jit(lambda p, r: [t5_generate(
      model, p, *enc.values(), r, steps=STEPS, start_id=1, temperature=t) for t in (0.0, 1.0)])
  return enc, generate(params, jax.random.key(3))


def test_cached_decoding_equals_full_recomputation(models, generated):
  _, params, apply = models[CFG]
  enc, ((greedy, greedy_lp), (sampled, sampled_lp)) = generated
  # Teacher-forcing the generated tokens through the uncached model gives the same
  # log-probabilities at every step (and greedy tokens are its argmax); both in one call.
  tokens = jnp.concatenate([greedy, sampled])
  full = {k: jnp.concatenate([v, v]) for k, v in enc.items()}
  full.update(decoder_inputs=jnp.concatenate([jnp.ones((4, 1), jnp.int32), tokens[:, :-1]], 1),
              decoder_positions=jnp.broadcast_to(jnp.arange(STEPS), (4, STEPS)),
              decoder_segment_ids=jnp.ones((4, STEPS), jnp.int32))
  logits = apply(params, full)
  expected = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(jnp.concatenate([greedy_lp, sampled_lp]), expected, atol=1e-5)
  argmax = jnp.argmax(logits, -1)
  np.testing.assert_array_equal(greedy, argmax[:2])
  assert not np.array_equal(sampled, argmax[2:])   # sampling really samples


def test_eval_decoding_scores_each_packed_example(models, generated):
  # One row packs both encoder rows of `generated` as two examples; their greedy outputs are
  # the targets, so every token scores, until one target token is changed.
  model, params, _ = models[CFG]
  enc, ((greedy, _), _) = generated
  lengths = (ENC, 6)
  cat = lambda parts: jnp.concatenate(parts)[None]
  batch = dict(
      encoder_inputs=cat([enc['encoder_inputs'][0], enc['encoder_inputs'][1, :6]]),
      encoder_positions=cat([jnp.arange(n) for n in lengths]),
      encoder_segment_ids=cat([jnp.full(n, s + 1) for s, n in enumerate(lengths)]),
      decoder_inputs=cat([jnp.ones(1, jnp.int32), greedy[0, :-1], jnp.ones(1, jnp.int32),
                          greedy[1, :-1]]),
      decoder_targets=cat([greedy[0], greedy[1]]),
      decoder_positions=cat([jnp.arange(STEPS)] * 2),
      decoder_segment_ids=cat([jnp.full(STEPS, 1), jnp.full(STEPS, 2)]),
      decoder_loss_mask=jnp.ones((1, 2 * STEPS)))
  score = jax.jit(lambda p, b: greedy_decode_scores(model, p, b, STEPS))
  assert jax.tree.map(float, score(params, batch)) == {
      'decode_accuracy': (14.0, 14.0), 'decode_exact_match': (2.0, 2.0)}
  wrong = dict(batch, decoder_targets=batch['decoder_targets'].at[0, 9].add(1))
  assert jax.tree.map(float, score(params, wrong)) == {
      'decode_accuracy': (13.0, 14.0), 'decode_exact_match': (1.0, 2.0)}


def test_decode_scores_align_targets_by_position():
  # Row 0: an example of 3 targets after one of 2 (only the second is scored, weights);
  # row 1: 4 targets but 3 decoded tokens, so the last one is a miss.
  tokens = jnp.asarray([[7, 8, 9], [4, 5, 6]])
  targets = jnp.asarray([[1, 2, 7, 8, 0], [4, 5, 6, 7, 0]])
  positions = jnp.asarray([[0, 1, 0, 1, 2], [0, 1, 2, 3, 0]])
  weights = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
  got = jax.tree.map(float, decode_scores(tokens, targets, positions, weights))
  assert got == {'decode_accuracy': (5.0, 7.0), 'decode_exact_match': (0.0, 2.0)}
  got = decode_scores(tokens, targets.at[0, 4].set(9), positions, weights)
  assert jax.tree.map(float, got)['decode_exact_match'] == (1.0, 2.0)


@pytest.mark.parametrize('cfg', [CFG, V1_ROPE], ids=['v1.1', 'v1.0_rope'])
def test_packed_examples_do_not_see_each_other(models, cfg):
  _, params, apply = models[cfg]
  assert ('lm_head' in params['decoder']) != cfg.tie_embeddings
  batch = seq2seq_batch(4, ENC, STEPS, cfg.vocab_size)
  packed = apply(params, batch)
  second = np.asarray(batch['decoder_segment_ids']) == 2
  changed = dict(batch, encoder_inputs=batch['encoder_inputs'].at[:, 0].set(5),
                 decoder_inputs=batch['decoder_inputs'].at[:, 0].set(5))
  out = apply(params, changed)
  np.testing.assert_allclose(out[second], packed[second], atol=1e-6)
  assert not np.allclose(out[~second], packed[~second])


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
