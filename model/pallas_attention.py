"""Pallas splash attention (JAX's shipped TPU flash-attention kernel) over packed segments,
causal or bidirectional, with grouped key/value heads.

The kernel works on one example and the heads it holds, so it runs per shard: under a mesh it
is wrapped in `jax.shard_map` over the mesh axes that the active logical-axis rules give
'batch' and 'heads' (this module never names a mesh axis). With `interpret=True` Pallas runs
it in its interpreter, on any backend (slowly): that is how CPU tests compare it with XLA.
"""

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

LANES = 128   # the kernel's key/value tiles are multiples of the TPU lane width


def block_size(length: int, requested: int) -> int:
  """The tile length used for a sequence of `length`: the largest divisor of `length` that
  divides `requested`; raises, naming the keys, when that is not a multiple of 128."""
  if requested % LANES:
    raise ValueError(f'model.attention_block_size={requested} must be a multiple of {LANES}.')
  block = math.gcd(length, requested)
  if block % LANES:
    raise ValueError(f"model.attention_impl='pallas' needs sequence lengths that are multiples "
                     f"of {LANES}, got {length}; change data.seq_len or use 'xla'.")
  return block


def _attend_one_shard(q, k, v, q_segment_ids, kv_segment_ids, *, causal: bool,
                      requested_block: int, interpret: bool):
  """Splash attention on local shards: q [B, H, T, D], k/v [B, KVH, S, D] -> [B, H, T, D]."""
  heads, t, s = q.shape[1], q.shape[2], k.shape[2]
  bq, bkv = block_size(t, requested_block), block_size(s, requested_block)
  blocks = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                             block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                             block_kv_dq=bkv)
  one_head = splash.CausalMask((t, s)) if causal else splash.FullMask((t, s))
  kernel = splash.make_splash_mha(splash.MultiHeadMask([one_head] * heads), block_sizes=blocks,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)
  per_example = lambda q, k, v, qs, kvs: kernel(q, k, v, segment_ids=splash.SegmentIds(qs, kvs))
  return jax.vmap(per_example)(q, k, v, q_segment_ids, kv_segment_ids)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
                     kv_segment_ids: jax.Array, *, causal: bool, scale: Optional[float],
                     requested_block: int, interpret: bool = False) -> jax.Array:
  """q [B, T, H, D], k/v [B, S, KVH, D], segment ids [B, T] / [B, S] -> [B, T, H, D].

  Tokens attend only within their segment id (and not ahead when `causal`); logits are
  multiplied by `scale` (None = 1/sqrt(D)). A query that sees no key (padding whose segment the
  keys lack) gets the mean of the values, as XLA's softmax over all-masked logits gives.
  """
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  heads_major = lambda x: jnp.swapaxes(x, 1, 2)
  args = (heads_major(q * jnp.asarray(scale, q.dtype)), heads_major(k), heads_major(v),
          q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32))
  fn = lambda *a: _attend_one_shard(*a, causal=causal, requested_block=requested_block,
                                    interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    q_spec = nn.logical_to_mesh_axes(('batch', 'heads', 'length', 'head_dim'))
    kv_spec = nn.logical_to_mesh_axes(('batch', 'kv_heads', 'length', 'head_dim'))
    if q_spec[1] != kv_spec[1] or q_spec[2:] != (None, None):
      raise ValueError(f"model.attention_impl='pallas' runs per (batch, heads) shard: the mesh "
                       f"rules must shard 'heads' and 'kv_heads' alike and leave 'length' and "
                       f"'head_dim' unsharded, got q {q_spec} and k/v {kv_spec}; fix mesh.rules.")
    # A dim its mesh axes do not divide (init traces a batch of 1) stays whole on every shard.
    splits = lambda axes, size: size % math.prod(
        mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ())) == 0
    batch = q_spec[0] if splits(q_spec[0], q.shape[0]) else None
    heads = q_spec[1] if splits(q_spec[1], k.shape[2]) else None   # KV heads split into groups
    spec, seg_spec = jax.P(batch, heads, None, None), jax.P(batch)
    fn = jax.shard_map(fn, in_specs=(spec, spec, spec, seg_spec, seg_spec), out_specs=spec,
                       check_vma=False)
  return heads_major(fn(*args))
