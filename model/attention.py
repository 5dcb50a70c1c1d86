"""Multi-head attention with grouped key/value heads (MHA, GQA and MQA by head counts)."""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.layers import Projection, apply_rope, rope_scaling

# attention_impl -> (backends it runs on, compute dtypes it takes); None = any.
IMPLEMENTATIONS = {
    'xla': (None, None),
    'cudnn': (('gpu', 'cuda'), ('bfloat16', 'float16')),   # cuDNN fused flash attention
}


def check_implementation(cfg: ModelConfig, backend: str) -> None:
  """Raises, naming the config key, when `cfg.attention_impl` cannot run on `backend`."""
  if cfg.attention_impl not in IMPLEMENTATIONS:
    raise ValueError(f'model.attention_impl={cfg.attention_impl!r}; choose one of '
                     f'{sorted(IMPLEMENTATIONS)}.')
  backends, dtypes = IMPLEMENTATIONS[cfg.attention_impl]
  if backends is not None and backend not in backends:
    raise ValueError(f'model.attention_impl={cfg.attention_impl!r} runs on {backends} devices, '
                     f"not on this {backend!r} backend; use 'xla' here.")
  if dtypes is not None and cfg.dtype not in dtypes:
    raise ValueError(f'model.attention_impl={cfg.attention_impl!r} needs model.dtype in '
                     f'{dtypes}, got {cfg.dtype!r}.')


def attention_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
                   causal: bool) -> jax.Array:
  """Boolean mask [B, 1, T, S]: same packed segment, and key not after query when causal.

  Padding (segment 0) only sees padding, so no real token ever attends across a segment.
  """
  mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
  if causal:
    t, s = q_segment_ids.shape[1], kv_segment_ids.shape[1]
    mask &= jnp.arange(t)[:, None] >= jnp.arange(s)[None, :]
  return mask[:, None]


class Attention(nn.Module):
  """Projects queries from `x_q` and keys/values from `x_kv`, attends under `mask`."""
  cfg: ModelConfig
  use_rope: bool = True

  @nn.compact
  def __call__(self, x_q: jax.Array, x_kv: jax.Array, mask: jax.Array,
               positions_q: Optional[jax.Array] = None,
               positions_kv: Optional[jax.Array] = None) -> jax.Array:
    cfg = self.cfg
    check_implementation(cfg, jax.default_backend())
    if cfg.num_heads % cfg.num_kv_heads:
      raise ValueError(f'model.num_heads={cfg.num_heads} must be a multiple of '
                       f'model.num_kv_heads={cfg.num_kv_heads}.')
    proj = lambda heads, axis, name, x: Projection(
        cfg, (heads, cfg.head_dim), ('embed',), (axis, 'head_dim'), use_bias=cfg.qkv_bias,
        name=name)(x)
    q = proj(cfg.num_heads, 'heads', 'query', x_q)
    k = proj(cfg.num_kv_heads, 'kv_heads', 'key', x_kv)
    v = proj(cfg.num_kv_heads, 'kv_heads', 'value', x_kv)
    if self.use_rope:
      q = apply_rope(q, positions_q, cfg.rope_theta, rope_scaling(cfg))
      k = apply_rope(k, positions_kv, cfg.rope_theta, rope_scaling(cfg))
    q = nn.with_logical_constraint(q, ('batch', 'length', 'heads', 'head_dim'))
    k = nn.with_logical_constraint(k, ('batch', 'length', 'kv_heads', 'head_dim'))
    v = nn.with_logical_constraint(v, ('batch', 'length', 'kv_heads', 'head_dim'))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=cfg.attention_impl)
    out = nn.with_logical_constraint(out, ('batch', 'length', 'heads', 'head_dim'))
    return Projection(cfg, (cfg.d_model,), ('heads', 'head_dim'), ('embed',), name='out')(out)
