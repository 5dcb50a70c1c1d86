"""Multi-head attention with grouped key/value heads (MHA, GQA and MQA by head counts)."""

from typing import Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from model.blocked_attention import blocked_attention, causal_window
from model.config import ModelConfig
from model.layers import Projection, apply_rope, rope_scaling
from model.pallas_attention import splash_attention

# attention_impl -> (backends it runs on, compute dtypes it takes); None = any.
IMPLEMENTATIONS = {
    'xla': (None, None),
    'cudnn': (('gpu', 'cuda'), ('bfloat16', 'float16')),   # cuDNN fused flash attention
    'pallas': (('tpu',), None),                            # Pallas splash attention kernel
    'pallas_interpret': (None, None),   # the same kernel in Pallas' interpreter (slow; tests)
}


def check_implementation(cfg: ModelConfig, backend: str) -> None:
  """Raises, naming the config key, when `cfg.attention_impl` cannot run on `backend`."""
  if cfg.attention_impl not in IMPLEMENTATIONS:
    raise ValueError(f'model.attention_impl={cfg.attention_impl!r}; choose one of '
                     f'{sorted(IMPLEMENTATIONS)}.')
  backends, dtypes = IMPLEMENTATIONS[cfg.attention_impl]
  if backends is not None and backend not in backends:
    here = sorted(n for n, (b, _) in IMPLEMENTATIONS.items() if b is None or backend in b)
    raise ValueError(f'model.attention_impl={cfg.attention_impl!r} runs on {backends} devices, '
                     f'not on this {backend!r} backend; use one of {here} here.')
  if dtypes is not None and cfg.dtype not in dtypes:
    raise ValueError(f'model.attention_impl={cfg.attention_impl!r} needs model.dtype in '
                     f'{dtypes}, got {cfg.dtype!r}.')


def attention_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
                   causal: bool, window: int = 0) -> jax.Array:
  """Boolean mask [B, 1, T, S]: same packed segment, and key not after query when causal
  (and, with a `window`, fewer than `window` positions before it).

  Padding (segment 0) only sees padding, so no real token ever attends across a segment.
  """
  mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  if causal:
    t, s = q_segment_ids.shape[1], kv_segment_ids.shape[1]
    mask &= causal_window(jnp.arange(t)[:, None], jnp.arange(s)[None, :], window)
  return mask[:, None]


class SegmentMask(struct.PyTreeNode):
  """`attention_mask`'s mask kept as segment ids, for kernels that take those (all but cuDNN):
  the XLA path skips causally masked key blocks, the Pallas kernel its masked tiles."""
  q_segment_ids: jax.Array    # [B, T]
  kv_segment_ids: jax.Array   # [B, S]
  causal: bool = struct.field(pytree_node=False)
  window: int = struct.field(pytree_node=False, default=0)   # see attention_mask


def layer_mask(cfg: ModelConfig, q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
               causal: bool) -> Union[jax.Array, SegmentMask]:
  """The mask a model hands its attention layers: segment ids, or for cuDNN the dense
  `attention_mask`, built once and shared by every layer. Causal masks carry
  `model.attention_window`."""
  window = cfg.attention_window if causal else 0
  if cfg.attention_impl == 'cudnn':
    return attention_mask(q_segment_ids, kv_segment_ids, causal, window)
  return SegmentMask(q_segment_ids, kv_segment_ids, causal, window)


def dense_mask(mask: Union[None, jax.Array, SegmentMask]) -> Optional[jax.Array]:
  """`mask` as a boolean array [B, 1, T, S] (or None)."""
  if isinstance(mask, SegmentMask):
    return attention_mask(mask.q_segment_ids, mask.kv_segment_ids, mask.causal, mask.window)
  return mask


class Attention(nn.Module):
  """Projects queries from `x_q` and keys/values from `x_kv`, attends under `mask`.

  `bias` (broadcastable to [B, heads, T, S]) is added to the logits (T5's relative positions).
  With `decode=True` keys/values live in the 'cache' collection: self-attention appends the new
  tokens at the cache index (the first call, which creates the cache, only sizes it), and with
  `cross_cache` the keys/values of `x_kv` are computed on the first call and reused after it.
  """
  cfg: ModelConfig
  use_rope: bool = True
  scale: Optional[float] = None   # logit multiplier; None = 1/sqrt(head_dim) (T5 uses 1.0)
  cross_cache: bool = False       # decode: keys/values of a fixed x_kv (cross-attention)

  @nn.compact
  def __call__(self, x_q: jax.Array, x_kv: Optional[jax.Array], mask: Optional[jax.Array],
               positions_q: Optional[jax.Array] = None,
               positions_kv: Optional[jax.Array] = None, bias: Optional[jax.Array] = None,
               decode: bool = False, deterministic: bool = True) -> jax.Array:
    cfg = self.cfg
    check_implementation(cfg, jax.default_backend())
    if cfg.num_heads % cfg.num_kv_heads:
      raise ValueError(f'model.num_heads={cfg.num_heads} must be a multiple of '
                       f'model.num_kv_heads={cfg.num_kv_heads}.')
    proj = lambda heads, axis, name, x, init_scale=1.0: Projection(
        cfg, (heads, cfg.head_dim), ('embed',), (axis, 'head_dim'),
        use_bias=cfg.qkv_bias or cfg.use_bias, init_scale=init_scale, name=name)(x,
                                                                                 deterministic)
    # A logit multiplier other than 1/sqrt(head_dim) is folded into the query init so initial
    # logits have the usual scale: unscaled T5 gets q stddev (d_model * head_dim)^-0.5, as
    # Mesh TensorFlow and T5X initialise it (keys/values/out keep fan-in init).
    q_init = 1.0 if self.scale is None else 1.0 / (cfg.head_dim * self.scale ** 2)
    q = proj(cfg.num_heads, 'heads', 'query', x_q, q_init)
    if self.use_rope:
      q = apply_rope(q, positions_q, cfg.rope_theta, rope_scaling(cfg))
    if decode and self.cross_cache and self.has_variable('cache', 'cached_key'):
      k = self.get_variable('cache', 'cached_key')
      v = self.get_variable('cache', 'cached_value')
    else:
      k = proj(cfg.num_kv_heads, 'kv_heads', 'key', x_kv)
      v = proj(cfg.num_kv_heads, 'kv_heads', 'value', x_kv)
      if self.use_rope:
        k = apply_rope(k, positions_kv, cfg.rope_theta, rope_scaling(cfg))
    q = nn.with_logical_constraint(q, ('batch', 'length', 'heads', 'head_dim'))
    k = nn.with_logical_constraint(k, ('batch', 'length', 'kv_heads', 'head_dim'))
    v = nn.with_logical_constraint(v, ('batch', 'length', 'kv_heads', 'head_dim'))
    if cfg.attention_impl.startswith('pallas'):
      out = self._pallas(q, k, v, mask, bias, decode)
    else:
      if decode:
        k, v, mask = self._cached(k, v, dense_mask(mask))
      if cfg.attention_impl == 'cudnn':
        out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=dense_mask(mask),
                                           scale=self.scale, implementation='cudnn')
      elif isinstance(mask, SegmentMask):
        out = blocked_attention(q, k, v, segment_ids=(mask.q_segment_ids, mask.kv_segment_ids),
                                causal=mask.causal, window=mask.window, bias=bias,
                                scale=self.scale, block_size=cfg.attention_query_block,
                                matmul_impl=cfg.matmul_impl)
      else:
        out = blocked_attention(q, k, v, mask=mask, bias=bias, scale=self.scale,
                                matmul_impl=cfg.matmul_impl)
    out = nn.with_logical_constraint(out, ('batch', 'length', 'heads', 'head_dim'))
    return Projection(cfg, (cfg.d_model,), ('heads', 'head_dim'), ('embed',),
                      use_bias=cfg.use_bias, name='out')(out, deterministic)

  def _pallas(self, q, k, v, mask, bias, decode):
    """The splash kernel, which covers self-attention over packed segments without a bias."""
    cfg = self.cfg
    unsupported = ('decodes from a KV cache' if decode else
                   'adds a logits bias (relative positions)' if bias is not None else
                   'has a dense mask' if not isinstance(mask, SegmentMask) else
                   'has a sliding window (model.attention_window)' if mask.window else None)
    if unsupported:
      raise ValueError(f'model.attention_impl={cfg.attention_impl!r} covers decoder and encoder '
                       f"self-attention over packed segments; this layer {unsupported}: use 'xla'.")
    return splash_attention(q, k, v, mask.q_segment_ids, mask.kv_segment_ids, causal=mask.causal,
                            scale=self.scale, requested_block=cfg.attention_block_size,
                            interpret=cfg.attention_impl == 'pallas_interpret')

  def _cached(self, k, v, mask):
    """Keys/values (and mask) to attend to in decode mode, updating the 'cache' collection."""
    axes = ('cache_batch', 'cache_length', 'cache_heads', 'cache_head_dim')
    if self.cross_cache:
      self.variable('cache', 'cached_key', lambda: nn.with_logical_constraint(k, axes))
      self.variable('cache', 'cached_value', lambda: nn.with_logical_constraint(v, axes))
      return k, v, mask
    if not self.has_variable('cache', 'cached_key'):   # creating the cache: size it only
      self.variable('cache', 'cached_key', jnp.zeros, k.shape, k.dtype)
      self.variable('cache', 'cached_value', jnp.zeros, v.shape, v.dtype)
      self.variable('cache', 'cache_index', lambda: jnp.zeros((), jnp.int32))
      return k, v, mask
    cached_k = self.variable('cache', 'cached_key')
    cached_v = self.variable('cache', 'cached_value')
    index = self.variable('cache', 'cache_index')
    start, new = index.value, k.shape[1]
    at = (0, start, 0, 0)
    cached_k.value = nn.with_logical_constraint(
        jax.lax.dynamic_update_slice(cached_k.value, k.astype(cached_k.value.dtype), at), axes)
    cached_v.value = nn.with_logical_constraint(
        jax.lax.dynamic_update_slice(cached_v.value, v.astype(cached_v.value.dtype), at), axes)
    index.value = start + new
    slots = cached_k.value.shape[1]
    causal = causal_window(start + jnp.arange(new)[:, None], jnp.arange(slots)[None, :],
                           self.cfg.attention_window)[None, None]
    return cached_k.value, cached_v.value, causal if mask is None else mask & causal
