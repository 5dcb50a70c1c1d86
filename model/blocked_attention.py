"""Dot-product attention in plain XLA that skips the masked-out half of causal attention.

Queries go in blocks; under a causal mask a query block only meets the keys up to its own end
(and, with a sliding window, from its first row's window start), so about half of the logits of
a long causal sequence are never computed, stored or differentiated. Grouped key/value heads
are folded into the query rows (keys and values are never repeated), keys and values are laid
out once as [B, K, S, D] so every block is one batched matmul, and logits and softmax are
float32. Keeping head_dim minor matters on CPU: with keys as [B, K, D, S] their gradient went
back to [B, S, K, D] through a transposing fusion that cost about 4% of a bench-m train step.
On XLA:CPU this is 2-3x faster than `jax.nn.dot_product_attention` with a dense mask, forward
plus backward (experiments/bench.py).

The backward is written out (a custom VJP) from the saved unnormalised probabilities, and the
forward normalises the [rows, head_dim] output instead of the [rows, keys] probabilities.
Differentiated through the softmax instead, XLA:CPU wrote the normalised probabilities and a
[rows, keys] broadcast of their row sums as extra passes over every block: the train step
was 1-4% (bench-s) and 4-8% (bench-m) slower, in in-process A/B runs of both orders.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from model import host_blas


def query_blocks(length: int, kv_length: int, causal: bool, block_size: int,
                 window: int = 0) -> list:
  """(start, stop, first, keys) per query block: rows start:stop attend to keys first:keys.
  Causal self-attention (length == kv_length) is split into blocks; anything else is one
  block. With a `window`, a block's keys start at its first row's earliest visible key."""
  if not causal or length != kv_length or block_size >= length:
    return [(0, length, 0, kv_length)]
  return [(a, min(a + block_size, length), max(0, a - window + 1) if window else 0,
           min(a + block_size, length)) for a in range(0, length, block_size)]


def causal_window(query: jax.Array, key: jax.Array, window: int) -> jax.Array:
  """Whether the key at index `key` is visible to the query at index `query` (broadcast): not
  after it and, with `window` > 0, one of the latest `window` keys up to it."""
  allowed = query >= key
  return allowed & (query - key < window) if window else allowed


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                      segment_ids: Optional[tuple] = None, causal: bool = False,
                      window: int = 0, mask: Optional[jax.Array] = None,
                      bias: Optional[jax.Array] = None, scale: Optional[float] = None,
                      block_size: int = 64, matmul_impl: str = 'xla') -> jax.Array:
  """softmax(scale * q k^T + bias, masked) v for q [B, T, N, D], k/v [B, S, K, D] (N % K == 0).

  A key is attended when it is in the query's segment (`segment_ids` = (q ids [B, T],
  kv ids [B, S])), not after it (`causal`, query i against key i), with `window` > 0 one of
  the latest `window` keys up to it (causal only), and allowed by `mask`
  (boolean, broadcastable to [B, N, T, S]); `bias` is broadcastable to [B, N, T, S].
  A row with no allowed key averages all values (as jax.nn.dot_product_attention does).
  `matmul_impl` 'blas' runs the block products through MKL (model/host_blas.py).
  """
  b, t, n, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  if window and not causal:
    raise ValueError(f'blocked_attention: window={window} needs causal=True.')
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
  blocks = tuple(query_blocks(t, s, causal, block_size, window))
  out = _attend(blocks, (causal, window), matmul_impl, qg, kt, vt, bias, segment_ids,
                mask)                                             # [B, K, G, T, D]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, d).astype(q.dtype)


def _rows(x: jax.Array) -> jax.Array:
  """[B, K, G, R, X] -> [B, K, G * R, X]: the grouped query heads folded into the rows."""
  return x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1])


# einsum over [B, K, ...] operands -> (trans_a, trans_b) of the same batched matmul
_PRODUCTS = {'bkqd,bksd->bkqs': (False, True), 'bkqs,bksd->bkqd': (False, False),
             'bkqs,bkqd->bksd': (True, False)}


def _product(impl: str, spec: str, a: jax.Array, b: jax.Array, **einsum_kwargs) -> jax.Array:
  """jnp.einsum(spec, a, b), or with `impl` 'blas' the same product through MKL over the
  (B, K) pairs as one batch."""
  if not host_blas.uses_blas(impl, a.dtype):
    return jnp.einsum(spec, a, b, **einsum_kwargs)
  out = host_blas.matmul(a.reshape(-1, *a.shape[2:]), b.reshape(-1, *b.shape[2:]),
                         *_PRODUCTS[spec])
  return out.reshape(a.shape[:2] + out.shape[1:])


def _forward(blocks, causality, impl, qg, kt, vt, bias, segment_ids, mask):
  """The output [B, K, G, T, D] and, per block, the unnormalised probabilities
  exp(logits - row max) [B, K, G, rows, keys] (float32) and 1 / their row sums."""
  b, kh, g, _, d = qg.shape
  outs, saved = [], []
  for start, stop, first, keys in blocks:
    rows = stop - start
    logits = _product(impl, 'bkqd,bksd->bkqs', _rows(qg[:, :, :, start:stop]),
                      kt[:, :, first:keys], preferred_element_type=jnp.float32).reshape(
                          b, kh, g, rows, keys - first)
    if bias is not None:
      logits = logits + bias[..., start:stop, first:keys].astype(jnp.float32)
    allowed = _allowed(segment_ids, causality, mask, start, stop, first, keys)
    if allowed is not None:
      logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    inv_total = 1.0 / probs.sum(axis=-1, keepdims=True)
    out = _product(impl, 'bkqs,bksd->bkqd', _rows(probs.astype(vt.dtype)), vt[:, :, first:keys])
    outs.append(out.reshape(b, kh, g, rows, d) * inv_total.astype(vt.dtype))
    saved.append((probs, inv_total))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
  return out, saved


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _attend(blocks, causality, impl, qg, kt, vt, bias, segment_ids, mask):
  """Attention of the scaled grouped queries qg [B, K, G, T, D] over kt/vt [B, K, S, D] in
  query `blocks`; bias and mask come grouped, [B|1, K|1, G|1, T, S]; `impl` is the
  matmul_impl of the block products."""
  return _forward(blocks, causality, impl, qg, kt, vt, bias, segment_ids, mask)[0]


def _attend_fwd(blocks, causality, impl, qg, kt, vt, bias, segment_ids, mask):
  out, saved = _forward(blocks, causality, impl, qg, kt, vt, bias, segment_ids, mask)
  return out, (qg, kt, vt, bias, segment_ids, mask, saved)


def _attend_bwd(blocks, causality, impl, residuals, dout):
  """Gradients of qg, kt, vt and bias; the key and value gradients of each block cover its
  keys and are padded to all of them."""
  qg, kt, vt, bias, segment_ids, mask, saved = residuals
  b, kh, g, _, d = qg.shape
  dqs, dk, dv = [], 0.0, 0.0
  dbias = None if bias is None else jnp.zeros(bias.shape, jnp.float32)
  for (start, stop, first, keys), (probs, inv_total) in zip(blocks, saved):
    rows = stop - start
    to_all_keys = lambda x: jnp.pad(x, [(0, 0), (0, 0), (first, kt.shape[2] - keys), (0, 0)])
    dout_rows = _rows(dout[:, :, :, start:stop])
    dprobs = _product(impl, 'bkqd,bksd->bkqs', dout_rows, vt[:, :, first:keys],
                      preferred_element_type=jnp.float32).reshape(b, kh, g, rows, keys - first)
    p = probs * inv_total
    dlogits = p * (dprobs - jnp.sum(dprobs * p, axis=-1, keepdims=True))
    allowed = _allowed(segment_ids, causality, mask, start, stop, first, keys)
    if allowed is not None:   # a row with no allowed key has uniform probs but no gradient
      dlogits = jnp.where(allowed, dlogits, 0.0)
    dlogits_rows = _rows(dlogits.astype(qg.dtype))
    dqs.append(_product(impl, 'bkqs,bksd->bkqd', dlogits_rows, kt[:, :, first:keys]).reshape(
        b, kh, g, rows, d))
    dk = dk + to_all_keys(_product(impl, 'bkqs,bkqd->bksd', dlogits_rows,
                                   _rows(qg[:, :, :, start:stop])))
    dv = dv + to_all_keys(_product(impl, 'bkqs,bkqd->bksd', _rows(p.astype(vt.dtype)),
                                   dout_rows))
    if bias is not None:   # summed over the dims the bias broadcasts along
      summed = tuple(i for i in range(3) if bias.shape[i] == 1 and dlogits.shape[i] != 1)
      dbias = dbias.at[..., start:stop, first:keys].add(dlogits.sum(axis=summed, keepdims=True))
  dq = dqs[0] if len(dqs) == 1 else jnp.concatenate(dqs, axis=3)
  return (dq.astype(qg.dtype), dk.astype(kt.dtype), dv.astype(vt.dtype),
          None if bias is None else dbias.astype(bias.dtype), None, None)


_attend.defvjp(_attend_fwd, _attend_bwd)


def _allowed(segment_ids, causality, mask, start, stop, first, keys) -> Optional[jax.Array]:
  """Boolean [B|1, K|1, G|1, rows, keys - first] of the block's attended keys, or None (all).
  `causality` is the pair (causal, window)."""
  allowed = None
  if segment_ids is not None:
    q_ids, kv_ids = segment_ids
    allowed = (q_ids[:, start:stop, None] == kv_ids[:, None, first:keys])[:, None, None]
  if causality[0]:
    upper = causal_window(jnp.arange(start, stop)[:, None], jnp.arange(first, keys)[None, :],
                          causality[1])
    allowed = upper if allowed is None else allowed & upper
  if mask is not None:
    block = mask[..., start:stop, first:keys]
    allowed = block if allowed is None else allowed & block
  return allowed
