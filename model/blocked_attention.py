"""Dot-product attention in plain XLA that skips the masked-out half of causal attention.

Queries go in blocks; under a causal mask a query block only meets the keys up to its own end,
so about half of the logits of a long causal sequence are never computed, stored or
differentiated. Grouped key/value heads are folded into the query rows (keys and values are
never repeated), keys and values are laid out once as [B, K, S, D] so every block is one
batched matmul, and logits and softmax are float32. Keeping head_dim minor matters on CPU:
with keys as [B, K, D, S] their gradient went back to [B, S, K, D] through a transposing
fusion that cost about 4% of a bench-m train step. On XLA:CPU this is 2-3x faster than
`jax.nn.dot_product_attention` with a dense mask, forward plus backward (experiments/bench.py).
"""

from typing import Optional

import jax
import jax.numpy as jnp


def query_blocks(length: int, kv_length: int, causal: bool, block_size: int) -> list:
  """(start, stop, keys) per query block: rows start:stop attend to keys 0:keys. Causal
  self-attention (length == kv_length) is split into blocks; anything else is one block."""
  if not causal or length != kv_length or block_size >= length:
    return [(0, length, kv_length)]
  return [(a, min(a + block_size, length), min(a + block_size, length))
          for a in range(0, length, block_size)]


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                      segment_ids: Optional[tuple] = None, causal: bool = False,
                      mask: Optional[jax.Array] = None, bias: Optional[jax.Array] = None,
                      scale: Optional[float] = None, block_size: int = 128) -> jax.Array:
  """softmax(scale * q k^T + bias, masked) v for q [B, T, N, D], k/v [B, S, K, D] (N % K == 0).

  A key is attended when it is in the query's segment (`segment_ids` = (q ids [B, T],
  kv ids [B, S])), not after it (`causal`, query i against key i) and allowed by `mask`
  (boolean, broadcastable to [B, N, T, S]); `bias` is broadcastable to [B, N, T, S].
  A row with no allowed key averages all values (as jax.nn.dot_product_attention does).
  """
  b, t, n, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  scale = d ** -0.5 if scale is None else scale
  qg = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, kh, g, d).transpose(0, 2, 3, 1, 4)
  kt = k.transpose(0, 2, 1, 3)                                    # [B, K, S, D]
  vt = v.transpose(0, 2, 1, 3)                                    # [B, K, S, D]
  grouped = lambda x: x.reshape(x.shape[0], kh, g, *x.shape[2:]) if x.shape[1] == n else (
      x[:, :, None])                                              # [B|1, K|1, G|1, T, S]
  mask = None if mask is None else grouped(jnp.broadcast_to(mask, mask.shape[:1] + (
      mask.shape[1], t, s)))
  bias = None if bias is None else grouped(jnp.broadcast_to(bias, bias.shape[:1] + (
      bias.shape[1], t, s)))
  outs = []
  for start, stop, keys in query_blocks(t, s, causal, block_size):
    rows = stop - start
    qb = qg[:, :, :, start:stop].reshape(b, kh, g * rows, d)
    logits = jnp.einsum('bkqd,bksd->bkqs', qb, kt[:, :, :keys],
                        preferred_element_type=jnp.float32).reshape(b, kh, g, rows, keys)
    if bias is not None:
      logits = logits + bias[..., start:stop, :keys].astype(jnp.float32)
    allowed = _allowed(segment_ids, causal, mask, start, stop, keys)
    if allowed is not None:
      logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, kh, g * rows, keys)
    out = jnp.einsum('bkqs,bksd->bkqd', probs, vt[:, :, :keys])
    outs.append(out.reshape(b, kh, g, rows, d))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, d).astype(q.dtype)


def _allowed(segment_ids, causal, mask, start, stop, keys) -> Optional[jax.Array]:
  """Boolean [B|1, K|1, G|1, rows, keys] of the block's attended keys, or None (all)."""
  allowed = None
  if segment_ids is not None:
    q_ids, kv_ids = segment_ids
    allowed = (q_ids[:, start:stop, None] == kv_ids[:, None, :keys])[:, None, None]
  if causal:
    upper = (jnp.arange(start, stop)[:, None] >= jnp.arange(keys)[None, :])
    allowed = upper if allowed is None else allowed & upper
  if mask is not None:
    block = mask[..., start:stop, :keys]
    allowed = block if allowed is None else allowed & block
  return allowed
