"""Autoregressive decoding from the attention KV cache (model/attention.py's 'cache' collection).

`decode_loop` is model-agnostic: it needs a step function that feeds one token per row and
returns logits and the updated cache. `decoder_generate` prefills a decoder's cache with the
prompts once and decodes; `t5_generate` encodes once, precomputes cross-attention keys/values
into the cache, and decodes.
Everything here is pure and jit-able (wrap it with Partitioner.jit).
"""

from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
from flax import traverse_util

# (cache, tokens [B, 1], step index) -> (logits [B, 1, vocab], new cache)
StepFn = Callable[[dict, jax.Array, jax.Array], tuple[jax.Array, dict]]


def sample(logits: jax.Array, rng: jax.Array, temperature: float) -> jax.Array:
  """Next tokens [B] from logits [B, vocab]: argmax if `temperature` is 0, else sampled."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, logits / temperature, axis=-1).astype(jnp.int32)


def decode_loop(step_fn: StepFn, cache: dict, first_tokens: jax.Array, rng: jax.Array, *,
                steps: int, temperature: float = 0.0, eos_id: Optional[int] = None,
                pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
  """Feeds `first_tokens` [B] then each chosen token back, `steps` times.

  Returns (tokens [B, steps], log-probabilities of those tokens [B, steps] under the model's
  softmax at temperature 1). After a row emits `eos_id`, it emits `pad_id` with log-prob 0.
  Step i's RNG is fold_in(rng, i).
  """
  def body(carry, i):
    cache, tokens, done = carry
    logits, cache = step_fn(cache, tokens[:, None], i)
    logits = logits[:, -1].astype(jnp.float32)
    chosen = sample(logits, jax.random.fold_in(rng, i), temperature)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), chosen[:, None], axis=-1)[:, 0]
    chosen = jnp.where(done, pad_id, chosen)
    logprob = jnp.where(done, 0.0, logprob)
    if eos_id is not None:
      done = done | (chosen == eos_id)
    return (cache, chosen, done), (chosen, logprob)

  start = (cache, first_tokens.astype(jnp.int32), jnp.zeros(first_tokens.shape, bool))
  _, (tokens, logprobs) = jax.lax.scan(body, start, jnp.arange(steps))
  return tokens.T, logprobs.T


def empty_cache(model, variables: dict, *args, **kwargs) -> dict:
  """The zeroed 'cache' collection that `model.apply(variables, *args, decode=True, **kwargs)`
  creates, built from shapes alone (no forward pass is run or compiled)."""
  shapes = jax.eval_shape(lambda: model.apply(variables, *args, decode=True, mutable=['cache'],
                                              **kwargs)[1]['cache'])
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def decoder_generate(model, params, prompt: jax.Array, lengths: jax.Array, rng: jax.Array, *,
                     steps: int, temperature: float = 0.0, eos_id: Optional[int] = None,
                     pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
  """Continues each row of `prompt` [B, P], LEFT-padded (its `lengths` real tokens end every
  row, so the last column is real), by `steps` tokens of a model.decoder.Decoder.

  One prefill writes all but the last prompt column into the KV cache; `decode_loop` then
  feeds the last column and one chosen token per step. Positions restart at each row's first
  real token and padding slots are masked, so a row continues as it would alone.
  Returns `decode_loop`'s (tokens [B, steps], log-probs).
  """
  rows, width = prompt.shape
  slots = jnp.arange(width - 1 + steps)[None]
  pad = (width - lengths)[:, None]
  kv_segments = (slots >= pad).astype(jnp.int32)                 # 0 = left padding
  positions = jnp.maximum(slots - pad, 0)

  def run(cache, tokens, start):
    n = tokens.shape[1]
    return model.apply({'params': params, 'cache': cache}, tokens,
                       jax.lax.dynamic_slice_in_dim(positions, start, n, axis=1),
                       jax.lax.dynamic_slice_in_dim(kv_segments, start, n, axis=1),
                       decode=True, kv_segment_ids=kv_segments, mutable=['cache'])

  cache = empty_cache(model, {'params': params}, jnp.zeros(positions.shape, jnp.int32),
                      positions, kv_segments, kv_segment_ids=kv_segments)
  if width > 1:
    cache = run(cache, prompt[:, :-1], 0)[1]['cache']

  def step(cache, tokens, i):
    logits, new = run(cache, tokens, width - 1 + i)
    return logits, new['cache']

  return decode_loop(step, cache, prompt[:, -1], rng, steps=steps, temperature=temperature,
                     eos_id=eos_id, pad_id=pad_id)


def t5_generate(model, params, encoder_inputs: jax.Array, encoder_positions: jax.Array,
                encoder_segment_ids: jax.Array, rng: jax.Array, *, steps: int,
                start_id: Union[int, jax.Array], temperature: float = 0.0,
                eos_id: Optional[int] = None, pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
  """Generates `steps` decoder tokens per row of a model.t5.T5 (one example per encoder row,
  segment id 0 = padding), starting from `start_id` (one id, or one per row [B]); returns
  `decode_loop`'s (tokens, log-probs)."""
  variables = {'params': params}
  encoded = model.apply(variables, encoder_inputs, encoder_positions, encoder_segment_ids,
                        method='encode')
  rows = encoder_inputs.shape[0]
  ones = lambda n: jnp.ones((rows, n), jnp.int32)
  decoder_args = lambda n: (encoded, encoder_segment_ids, ones(n),
                            jnp.broadcast_to(jnp.arange(n), (rows, n)), ones(n))
  # Self-attention slots start as zeros (from shapes alone); the cross-attention keys/values
  # are projections of `encoded`, which a one-token decoder pass computes.
  cache = traverse_util.flatten_dict(
      empty_cache(model, variables, *decoder_args(steps), method='decode'))
  _, created = model.apply(variables, *decoder_args(1), decode=True, mutable=['cache'],
                           method='decode')
  cache.update((k, v) for k, v in traverse_util.flatten_dict(created['cache']).items()
               if 'cross_attn' in k)

  def step(cache, tokens, i):
    logits, new = model.apply({'params': params, 'cache': cache}, None, encoder_segment_ids,
                              tokens, jnp.full((rows, 1), i, jnp.int32), ones(1),
                              decode=True, decode_length=steps, mutable=['cache'],
                              method='decode')
    return logits, new['cache']

  first = jnp.broadcast_to(jnp.asarray(start_id, jnp.int32), (rows,))
  return decode_loop(step, traverse_util.unflatten_dict(cache), first, rng, steps=steps,
                     temperature=temperature, eos_id=eos_id, pad_id=pad_id)
