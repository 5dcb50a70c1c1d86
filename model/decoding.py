"""Autoregressive decoding from the attention KV cache (model/attention.py's 'cache' collection).

`decode_loop` is model-agnostic: it needs a step function that feeds one token per row and
returns logits and the updated cache, so decoder-only generation reuses it with its own step.
`t5_generate` encodes once, precomputes cross-attention keys/values into the cache, and decodes.
Everything here is pure and jit-able (wrap it with Partitioner.jit).
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp

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


def t5_generate(model, params, encoder_inputs: jax.Array, encoder_positions: jax.Array,
                encoder_segment_ids: jax.Array, rng: jax.Array, *, steps: int, start_id: int,
                temperature: float = 0.0, eos_id: Optional[int] = None,
                pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
  """Generates `steps` decoder tokens per row of a model.t5.T5 (one example per encoder row,
  segment id 0 = padding); returns `decode_loop`'s (tokens, log-probs)."""
  variables = {'params': params}
  encoded = model.apply(variables, encoder_inputs, encoder_positions, encoder_segment_ids,
                        method='encode')
  rows = encoder_inputs.shape[0]
  ones = jnp.ones((rows, steps), jnp.int32)
  # Creating the cache sizes the self-attention slots and fills the cross-attention keys/values.
  _, state = model.apply(variables, encoded, encoder_segment_ids, ones,
                         jnp.broadcast_to(jnp.arange(steps), (rows, steps)), ones,
                         decode=True, mutable=['cache'], method='decode')

  def step(cache, tokens, i):
    logits, new = model.apply({'params': params, 'cache': cache}, None, encoder_segment_ids,
                              tokens, jnp.full((rows, 1), i, jnp.int32), ones[:, :1],
                              decode=True, decode_length=steps, mutable=['cache'],
                              method='decode')
    return logits, new['cache']

  return decode_loop(step, state['cache'], jnp.full((rows,), start_id, jnp.int32), rng,
                     steps=steps, temperature=temperature, eos_id=eos_id, pad_id=pad_id)
