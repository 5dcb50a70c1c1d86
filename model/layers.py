"""Building blocks shared by every model family: norms, embeddings, projections, MLPs, RoPE.

Every parameter carries logical axis names (train/sharding.py maps them onto a mesh);
nothing here knows about devices.
"""

import functools
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from model import host_blas, lora, nf4
from model.config import ModelConfig

# name -> (function, gated). 'gelu' is the tanh approximation; 'gelu_exact' the erf form (BERT).
def silu(x: jax.Array) -> jax.Array:
  """x * sigmoid(x), differentiated as written: its backward costs ~15% less CPU per gated MLP
  than jax.nn.silu's custom derivative on XLA:CPU (measured, bench-s shape)."""
  return x * jax.nn.sigmoid(x)


ACTIVATIONS = {'swiglu': (silu, True), 'geglu': (jax.nn.gelu, True),
               'relu': (jax.nn.relu, False), 'gelu': (jax.nn.gelu, False),
               'gelu_exact': (functools.partial(jax.nn.gelu, approximate=False), False)}


def kernel_init(axes: Sequence[str], fan_in_axes: int = 1, scale: float = 1.0):
  """Truncated normal of variance `scale` / fan-in for a kernel whose first `fan_in_axes` dims
  are contracted, annotated with logical `axes`."""
  init = nn.initializers.variance_scaling(
      scale, 'fan_in', 'truncated_normal', in_axis=tuple(range(fan_in_axes)),
      out_axis=tuple(range(fan_in_axes, len(axes))))
  return nn.with_logical_partitioning(init, tuple(axes))


class RMSNorm(nn.Module):
  """Root-mean-square norm with a learned scale (no bias, no mean subtraction)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                       (x.shape[-1],), self.cfg.weight_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.cfg.norm_eps)
    return (y * scale.astype(jnp.float32)).astype(self.cfg.compute_dtype)


class LayerNorm(nn.Module):
  """Mean-subtracted, variance-normalised norm with a learned scale and bias (BERT)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    param = lambda name, init: self.param(
        name, nn.with_logical_partitioning(init, ('norm',)), (x.shape[-1],), self.cfg.weight_dtype)
    scale, bias = param('scale', nn.initializers.ones), param('bias', nn.initializers.zeros)
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
                                + self.cfg.norm_eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(
        self.cfg.compute_dtype)


NORMS = {'rms': RMSNorm, 'layernorm': LayerNorm}


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
  """The norm `model.norm_type` asks for, named `name`."""
  if cfg.norm_type not in NORMS:
    raise ValueError(f'model.norm_type={cfg.norm_type!r}; choose one of {sorted(NORMS)}.')
  return NORMS[cfg.norm_type](cfg, name=name)


def token_matmul(x: jax.Array, w: jax.Array, n_in: int = 1, w_out_first: bool = False,
                 impl: str = 'xla') -> jax.Array:
  """x [..., *in] times w [*in, *out] (or w [*out, *in] with `w_out_first`) -> [..., *out], as
  one 2-D matmul over all leading (token) positions, by XLA or (`impl='blas'`) by MKL through
  model/host_blas.py. With the tokens flattened, the weight gradient (x^T dy) is a plain
  transposed-operand matmul; left 3-D, XLA:CPU lays dy out transposed with an extra copy first,
  which made a gated MLP's forward+backward 1.4x slower."""
  lead, in_shape = x.shape[:-n_in], x.shape[-n_in:]
  x2 = x.reshape(-1, math.prod(in_shape))
  if w_out_first:
    out_shape, w2 = w.shape[:w.ndim - n_in], w.reshape(-1, x2.shape[1])
  else:
    out_shape, w2 = w.shape[n_in:], w.reshape(x2.shape[1], -1)
  if host_blas.uses_blas(impl, x.dtype):
    y = host_blas.matmul(x2, w2, trans_b=w_out_first)
  else:
    y = jax.lax.dot_general(x2, w2, (((1,), (1 if w_out_first else 0,)), ((), ())))
  return y.reshape(lead + out_shape)


def token_gram(x: jax.Array, y: jax.Array, impl: str = 'xla') -> jax.Array:
  """x^T y over all leading (token) positions: x [..., m], y [..., n] -> [m, n] in float32, by
  XLA or (`impl='blas'`) by MKL. XLA gets the leading dims unflattened: it then copies x
  transposed for YNNPACK's matmul, where the flattened 2-D form compiles to a plain dot."""
  if host_blas.uses_blas(impl, x.dtype):
    return host_blas.matmul(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]),
                            trans_a=True)
  lead = tuple(range(x.ndim - 1))
  return jax.lax.dot_general(x, y, ((lead, lead), ((), ())), preferred_element_type=jnp.float32)


class Projection(nn.Module):
  """Contracts the last len(in_axes) dims of x with a kernel [*in, *features].

  The kernel's logical axes are `in_axes + out_axes`; the optional bias has `out_axes`.
  A projection whose name is in `model.lora_targets` adds a LoRA adapter (model/lora.py).
  With `model.lora_quant='nf4'` the kernel is stored as 4-bit NF4 codes and block absmaxes
  (model/nf4.py) under 'kernel_nf4' and 'kernel_absmax', with the kernel's logical axes, and
  dequantized for each use.
  """
  cfg: ModelConfig
  features: tuple[int, ...]
  in_axes: tuple[str, ...]
  out_axes: tuple[str, ...]
  use_bias: bool = False
  init_scale: float = 1.0   # kernel init variance = init_scale / fan-in

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    n_in = len(self.in_axes)
    shape = x.shape[-n_in:] + tuple(self.features)
    init = kernel_init(self.in_axes + self.out_axes, n_in, self.init_scale)
    if lora.quantized(self.cfg):
      kernel = self._nf4_kernel(init, shape, n_in - 1)
    else:
      kernel = self.param('kernel', init, shape, self.cfg.weight_dtype)
    dtype = self.cfg.compute_dtype
    x = x.astype(dtype)
    y = token_matmul(x, kernel.astype(dtype), n_in, impl=self.cfg.matmul_impl)
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros,
                        self.out_axes), tuple(self.features), self.cfg.weight_dtype)
      y = y + bias.astype(dtype)
    if lora.is_target(self.cfg, self.name):
      y = y + self._adapter(x, deterministic)
    return y

  def _nf4_kernel(self, init, shape: tuple, axis: int) -> jax.Array:
    """The kernel from its NF4 parameters, quantized along `axis` from a float init."""
    cfg = self.cfg
    block = cfg.lora_quant_block
    if block < 4 or block % 2 or shape[axis] % block:
      raise ValueError(f'model.lora_quant_block={block} must be even, at least 4 and divide '
                       f'{shape[axis]}, the length of projection {self.name!r} along its last '
                       'input axis.')
    stored = {}

    def part(i):
      def make(rng):
        if not stored:   # codes and absmax come from one float kernel
          stored['q'] = nf4.quantize(nn.unbox(init(rng, shape, jnp.float32)), axis, block)
        return stored['q'][i]
      return nn.with_logical_partitioning(make, self.in_axes + self.out_axes)

    codes, absmax = (self.param(name, part(i)) for i, name in enumerate(nf4.PARTS))
    return nf4.dequantize(codes, absmax, cfg.weight_dtype)

  def _adapter(self, x: jax.Array, deterministic: bool) -> jax.Array:
    """scale * (dropout(x) A) B with A [*in, rank], B [rank, *features]; W + A B is never
    formed, and B starts at zero so a fresh adapter changes nothing."""
    cfg, n_in = self.cfg, len(self.in_axes)
    x = nn.Dropout(cfg.lora_dropout, name='lora_dropout')(x, deterministic=deterministic)
    a = self.param('lora_a', kernel_init(self.in_axes + (None,), n_in),
                   x.shape[-n_in:] + (cfg.lora_rank,), cfg.weight_dtype)
    b = self.param('lora_b', nn.with_logical_partitioning(nn.initializers.zeros,
                                                          (None,) + self.out_axes),
                   (cfg.lora_rank,) + tuple(self.features), cfg.weight_dtype)
    xa = token_matmul(x, a.astype(x.dtype), n_in, impl=cfg.matmul_impl)
    return token_matmul(xa * lora.scale(cfg), b.astype(x.dtype), impl=cfg.matmul_impl)


class Embed(nn.Module):
  """Embedding table [rows, embed] (tokens by default; also learned positions and token
  types); `output_head` reads it as the tied output projection."""
  cfg: ModelConfig
  rows: int = 0                        # table rows; 0 = model.vocab_size
  row_axis: Optional[str] = 'vocab'    # logical axis of the rows; None keeps small tables whole

  def setup(self):
    self.embedding = self.param(
        'embedding', nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                  (self.row_axis, 'embed')),
        (self.rows or self.cfg.vocab_size, self.cfg.d_model), self.cfg.weight_dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    # Gathering rows from a sharded table makes SPMD replicate it badly; all-gathering the
    # table first (as FSDP does for every weight) partitions the lookup cleanly.
    table = nn.with_logical_constraint(self.embedding, (None, None))
    x = jnp.take(table, ids, axis=0).astype(self.cfg.compute_dtype)
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed'))


class Unembed(nn.Module):
  """Untied output projection [vocab, embed], the layout of the embedding table and of Hugging
  Face's lm_head.weight. Its weight gradient (logits' cotangent^T x) is about 1.5x cheaper on
  XLA:CPU than with an [embed, vocab] kernel (measured)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self) -> jax.Array:
    init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal', in_axis=1,
                                            out_axis=0)
    return self.param('kernel', nn.with_logical_partitioning(init, ('vocab', 'embed')),
                      (self.cfg.vocab_size, self.cfg.d_model), self.cfg.weight_dtype)


class OutputHead(struct.PyTreeNode):
  """Final hidden states and the output projection: logits = hidden kernel^T + bias.

  Models return this instead of logits when called with `return_head=True`, so a loss over a
  large vocabulary can form the logits a chunk of tokens at a time
  (train/objectives/losses.py) instead of materialising all of them.
  """
  hidden: jax.Array              # [..., embed], compute dtype
  kernel: jax.Array              # [vocab, embed], compute dtype, any logit scale folded in
  bias: Optional[jax.Array] = None   # [vocab] or None
  matmul_impl: str = struct.field(pytree_node=False, default='xla')   # model.matmul_impl

  def logits(self) -> jax.Array:
    """float32 logits [..., vocab]."""
    logits = token_matmul(self.hidden, self.kernel, w_out_first=True, impl=self.matmul_impl)
    if self.bias is not None:
      logits = logits + self.bias
    return nn.with_logical_constraint(logits.astype(jnp.float32), ('batch', 'length', 'vocab'))


def output_head(cfg: ModelConfig, embed: Embed, x: jax.Array,
                lm_head: Optional[nn.Module] = None) -> OutputHead:
  """The head over the tied embedding (scaled by 1/sqrt(d_model)) or an lm_head (`lm_head`,
  else one made here under that name)."""
  dtype = cfg.compute_dtype
  if cfg.tie_embeddings:
    kernel = embed.embedding.astype(dtype) / jnp.sqrt(cfg.d_model).astype(dtype)
  else:
    kernel = (lm_head or Unembed(cfg, name='lm_head'))().astype(dtype)
  return OutputHead(x.astype(dtype), kernel, matmul_impl=cfg.matmul_impl)


class MLP(nn.Module):
  """Feed-forward block: gated (SwiGLU, GeGLU) or plain (ReLU, GELU); biases if model.use_bias."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    cfg = self.cfg
    if cfg.activation not in ACTIVATIONS:
      raise ValueError(f'model.activation={cfg.activation!r}; choose one of {sorted(ACTIVATIONS)}.')
    act, gated = ACTIVATIONS[cfg.activation]
    up = lambda name: Projection(cfg, (cfg.mlp_dim,), ('embed',), ('mlp',), use_bias=cfg.use_bias,
                                 name=name)(x, deterministic)
    h = act(up('wi_0')) * up('wi_1') if gated else act(up('wi'))
    h = nn.with_logical_constraint(h, ('batch', 'length', 'mlp'))
    return Projection(cfg, (cfg.d_model,), ('mlp',), ('embed',), use_bias=cfg.use_bias,
                      name='wo')(h, deterministic)


def rope_scaling(cfg: ModelConfig) -> tuple:
  """The `scaling` argument of apply_rope for `cfg`: () or (factor, low, high, original_len)."""
  if cfg.rope_scaling not in ('', 'llama3'):
    raise ValueError(f"model.rope_scaling={cfg.rope_scaling!r}; choose '' or 'llama3'.")
  if not cfg.rope_scaling:
    return ()
  return (cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
          cfg.rope_original_max_len)


def _llama3_scaled(freq: jax.Array, factor, low, high, original_len) -> jax.Array:
  """Llama 3.1: long wavelengths slowed by `factor`, short kept, a smooth blend between."""
  wavelen = 2 * jnp.pi / freq
  smooth = (original_len / wavelen - low) / (high - low)
  blended = (1 - smooth) * freq / factor + smooth * freq
  return jnp.where(wavelen > original_len / low, freq / factor,
                   jnp.where(wavelen < original_len / high, freq, blended))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float, scaling: tuple = ()) -> jax.Array:
  """Rotary embedding, half-split convention (as in Hugging Face Llama): x [B, L, H, D].

  `scaling` (from rope_scaling(cfg)) rescales the frequencies as Llama 3.1 does."""
  half = x.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  if scaling:
    freq = _llama3_scaled(freq, *scaling)
  sin, cos = _stored_on_cpu(_rope_tables(positions, freq), positions, freq)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _rope_tables(positions: jax.Array, freq: jax.Array) -> tuple:
  """(sin, cos) of the rotation angles, [B, L, 1, half]."""
  angle = positions.astype(jnp.float32)[..., None] * freq            # [B, L, half]
  return jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]


def _stored_on_cpu(tables: tuple, positions: jax.Array, freq: jax.Array) -> tuple:
  """`tables`, made to be computed once and stored when compiled for CPU.

  XLA:CPU fuses sin/cos into every consumer, so they would be recomputed per head, per half and
  again in the backward pass: about 10% of a bench-s train step. A conditional is a fusion
  boundary, so its operands are stored. Both branches give the same tables (one passes them on,
  one recomputes them), so the predicate cannot change a result; it only has to depend on data
  for XLA to keep the conditional. Other backends skip it: a GPU reads a conditional's
  predicate back to the host.
  """
  def stored():
    return jax.lax.cond(positions[0, 0] >= 0, lambda t, p: t,
                        lambda t, p: _rope_tables(p, freq), tables, positions)
  return jax.lax.platform_dependent(cpu=stored, default=lambda: tables)
