"""Encoder–decoder objectives: T5 span corruption, and prefix-LM over plain 'lm' rows."""

import jax
import jax.numpy as jnp

from data.pipeline import target_length
from model.decoding import t5_generate
from train.objectives.base import Objective
from train.objectives.losses import token_cross_entropy

ENCODER_KEYS = ('encoder_inputs', 'encoder_positions', 'encoder_segment_ids')
DECODER_KEYS = ('decoder_inputs', 'decoder_positions', 'decoder_segment_ids')


def decode_scores(tokens: jax.Array, targets: jax.Array, positions: jax.Array,
                  weights: jax.Array) -> dict:
  """Free-running decoder output vs the targets, as (sum, count) metrics.

  `tokens` [B, steps] are one example's decoded tokens per row; `targets`, `positions` and
  `weights` [B, T] locate its target tokens in the packed decoder row (weight > 0) and their
  index within the example. 'decode_accuracy' counts target tokens decoded at their index;
  'decode_exact_match' counts examples decoded without a miss (targets past `steps` are misses).
  """
  width = max(tokens.shape[1], targets.shape[1])
  tokens = jnp.pad(tokens, ((0, 0), (0, width - tokens.shape[1])), constant_values=-1)
  real = weights > 0
  right = (jnp.take_along_axis(tokens, positions, axis=1) == targets) & real
  example = real.any(axis=1)
  exact = example & (right == real).all(axis=1)
  f32 = lambda x: x.sum().astype(jnp.float32)
  return {'decode_accuracy': (f32(right), f32(real)),
          'decode_exact_match': (f32(exact), f32(example))}


def greedy_decode_scores(model, params, batch: dict, steps: int) -> dict:
  """Greedy `t5_generate` of every packed example of a 'span_corruption'-format batch, one
  segment index at a time (each row's k-th example together), scored by `decode_scores`."""
  def one_segment(k, total):
    enc = (batch['encoder_segment_ids'] == k).astype(jnp.int32)
    dec = batch['decoder_segment_ids'] == k
    # Each example's first decoder input (the start id, or prefix-LM's last prefix token).
    first = dec & (batch['decoder_positions'] == 0)
    start = jnp.where(first, batch['decoder_inputs'], 0).sum(axis=1)
    tokens, _ = t5_generate(model, params, batch['encoder_inputs'], batch['encoder_positions'],
                            enc, jax.random.key(0), steps=steps, start_id=start)
    scores = decode_scores(tokens, batch['decoder_targets'], batch['decoder_positions'],
                           dec * batch['decoder_loss_mask'])
    return jax.tree.map(jnp.add, total, scores)

  zero = (jnp.zeros((), jnp.float32),) * 2
  return jax.lax.fori_loop(1, batch['decoder_segment_ids'].max() + 1, one_segment,
                           {'decode_accuracy': zero, 'decode_exact_match': zero})


def _seq2seq(model, config, make_batch, encoder_len: int, decoder_len: int) -> Objective:
  """Teacher-forced cross-entropy of decoder_targets under decoder_loss_mask, on the batch
  that `make_batch(batch, rng)` gives in the 'span_corruption' format; its `decode_fn` decodes
  `train.eval_decode_len` tokens (0 = `decoder_len`) of every example greedily."""
  z_loss, chunk_tokens = config.train.z_loss, config.train.loss_chunk_tokens
  decode_steps = config.train.eval_decode_len or decoder_len

  def init_fn(rng):
    enc = jnp.zeros((1, encoder_len), jnp.int32)
    dec = jnp.zeros((1, decoder_len), jnp.int32)
    return model.init({'params': rng}, enc, enc, enc + 1, dec, dec, dec + 1)['params']

  def loss_fn(params, batch, rng, *, train: bool):
    split_rng, dropout_rng = jax.random.split(rng)
    batch = make_batch(batch, split_rng)
    head = model.apply({'params': params}, *(batch[k] for k in ENCODER_KEYS + DECODER_KEYS),
                       deterministic=not train, return_head=True, rngs={'dropout': dropout_rng})
    return token_cross_entropy(head, batch['decoder_targets'], batch['decoder_loss_mask'],
                               z_loss, chunk_tokens)

  def decode_fn(params, batch, rng):
    # The same split of the rows as loss_fn(params, batch, rng) scores.
    return greedy_decode_scores(model, params, make_batch(batch, jax.random.split(rng)[0]),
                                decode_steps)

  return Objective(loss_fn=loss_fn, init_fn=init_fn, decode_fn=decode_fn)


def span_corruption(model, config) -> Objective:
  """T5 span corruption on the data layer's 'span_corruption' batches: the encoder reads the
  text with sentinels in place of spans, the decoder predicts each sentinel and its span."""
  return _seq2seq(model, config, lambda batch, rng: batch, config.data.seq_len,
                  target_length(config))


def split_prefix(batch: dict, rng: jax.Array) -> dict:
  """An 'lm' batch -> the 'span_corruption' format: every packed segment is cut at a uniform
  random point; the encoder reads the prefix, the decoder continues from its last token.

  Both streams keep the row's layout (tokens outside a stream get segment id 0), so no data
  moves; the decoder's first input is the prefix's last token, its first target the first
  token after the prefix, and only continuation tokens carry loss.
  """
  seg, pos = batch['segment_ids'], batch['positions']
  rows, length = seg.shape
  flat = seg + (length + 1) * jnp.arange(rows)[:, None]
  seg_len = jax.ops.segment_max(pos.ravel(), flat.ravel(), rows * (length + 1)) + 1
  seg_len = seg_len.reshape(rows, length + 1)
  draw = jax.random.uniform(rng, (rows, length + 1))
  tok_len = jnp.take_along_axis(seg_len, seg, axis=1)
  tok_draw = jnp.take_along_axis(draw, seg, axis=1)
  split = 1 + jnp.floor(tok_draw * (tok_len - 1)).astype(pos.dtype)   # prefix length >= 1
  in_prefix, in_decoder = pos < split, pos >= split - 1
  return {'encoder_inputs': batch['inputs'], 'encoder_positions': pos,
          'encoder_segment_ids': jnp.where(in_prefix, seg, 0),
          'decoder_inputs': batch['inputs'], 'decoder_targets': batch['targets'],
          'decoder_positions': jnp.where(in_decoder, pos - (split - 1), 0),
          'decoder_segment_ids': jnp.where(in_decoder, seg, 0),
          'decoder_loss_mask': batch['loss_mask'] * in_decoder}


def prefix_lm(model, config) -> Objective:
  """Prefix-LM for the encoder–decoder on 'lm' batches (see `split_prefix`); the encoder and
  decoder both run over the full row length."""
  return _seq2seq(model, config, split_prefix, config.data.seq_len, config.data.seq_len)
