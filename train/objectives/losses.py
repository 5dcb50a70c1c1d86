"""Token-level losses shared by the objectives, as (sum, count) metrics.

The cross-entropy takes the model's OutputHead (final hidden states and output projection),
not its logits: it forms the float32 logits of a chunk of tokens at a time and that chunk's
gradients while they are at hand, so the [tokens, vocab] logits and their cotangent never
exist whole. Memory for them is bounded by the chunk everywhere; on XLA:CPU the chunk stays in
cache: output head and loss 1.33x (bench-s) and 1.17x (bench-m) faster than over whole logits,
train steps about 3% and 8% faster (measured with `train.loss_chunk_tokens` 512)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from model.layers import OutputHead, token_gram, token_matmul


def token_cross_entropy(head: OutputHead, targets: jax.Array, weights: jax.Array,
                        z_loss: float = 0.0, chunk_tokens: int = 0) -> dict:
  """Cross-entropy, z-loss (z_loss * log(Z)^2) and accuracy over weighted tokens.

  `head.hidden` is [B, L, D]; `targets`, `weights` are [B, L]. The logits of about
  `chunk_tokens` tokens (B rows times a slice of positions; 0 = all) are formed at a time.
  'loss' = cross-entropy + z-loss is the optimized term and the only one with a gradient; all
  entries are (sum, count).
  """
  rows, length = targets.shape
  chunk = length if chunk_tokens <= 0 else max(1, min(length, chunk_tokens // rows))
  pad = -length % chunk
  pad_positions = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
  # [B, L, ...] -> [chunks, B, chunk, ...]: every chunk keeps the batch dim (and its sharding).
  split = lambda a: jnp.moveaxis(pad_positions(a).reshape(rows, -1, chunk, *a.shape[2:]), 1, 0)
  weights = weights.astype(jnp.float32)
  loss, ce, z, correct = _chunked_cross_entropy(
      z_loss, head.matmul_impl, split(head.hidden), head.kernel, head.bias, split(targets),
      split(weights))
  count = weights.sum()
  ce, z, correct = jax.lax.stop_gradient((ce, z, correct))
  return {'loss': (loss, count), 'cross_entropy': (ce, count), 'z_loss': (z, count),
          'accuracy': (correct, count)}


def _chunk_terms(z_loss, impl, wanted, x, kernel, bias, targets, weights):
  """Weighted sums (loss, ce, z, correct) over one chunk x [B, C, D] and the loss's gradients
  named in `wanted` ⊆ {'x', 'kernel', 'bias'}: dx [B, C, D], dkernel^T [D, V] and dbias [V]
  (float32), None where not wanted. `impl` is model.matmul_impl, for the three matmuls.

  The kernel's gradient is formed transposed, x^T dlogits (model.layers.token_gram): XLA:CPU
  then copies the small x chunk transposed and runs YNNPACK's matmul, where dlogits^T x falls
  back to Eigen's transposed-operand kernel, about 1.6x slower at the bench shapes (measured)."""
  logits = token_matmul(x, kernel, w_out_first=True, impl=impl)
  if bias is not None:
    logits = logits + bias
  logits = nn.with_logical_constraint(logits.astype(jnp.float32), ('batch', 'length', 'vocab'))
  vocab = logits.shape[-1]
  top = jnp.max(logits, axis=-1, keepdims=True)
  exp = jnp.exp(logits - top)
  total = exp.sum(axis=-1, keepdims=True)
  log_z = (jnp.log(total) + top)[..., 0]
  is_target = targets[..., None] == jnp.arange(vocab)
  target_logit = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
  # argmax as one min-reduce over the maximum already taken: XLA:CPU runs argmax's
  # (value, index) reduce unvectorised, about 2% of a bench-s train step.
  first_argmax = jnp.min(jnp.where(logits == top, jnp.arange(vocab), vocab), axis=-1)
  ce = ((log_z - target_logit) * weights).sum()
  z = z_loss * (jnp.square(log_z) * weights).sum()
  correct = ((first_argmax == targets) * weights).sum()
  sums = (ce + z, ce, z, correct)
  if not wanted:
    return sums, (None, None, None)
  # d(log Z - target logit + z_loss log(Z)^2)/dlogits = softmax (1 + 2 z_loss log Z) - onehot
  scale = (1.0 + 2.0 * z_loss * log_z) * weights / total[..., 0]
  dlogits = exp * scale[..., None] - jnp.where(is_target, weights[..., None], 0.0)
  dx = token_matmul(dlogits.astype(x.dtype), kernel, impl=impl) if 'x' in wanted else None
  dkernel_t = token_gram(x, dlogits.astype(x.dtype), impl) if 'kernel' in wanted else None
  dbias = dlogits.sum(axis=(0, 1)) if 'bias' in wanted else None
  return sums, (dx, dkernel_t, dbias)


def _scan_chunks(z_loss, impl, wanted, x, kernel, bias, targets, weights):
  """Sums over chunks x [N, B, C, D] and the `wanted` gradients (dx stacked like x)."""
  zeros = lambda shape, name: jnp.zeros(shape, jnp.float32) if name in wanted else None
  sums_init = (jnp.zeros((), jnp.float32),) * 4
  grads_init = (zeros(kernel.shape[::-1], 'kernel'),
                None if bias is None else zeros(bias.shape, 'bias'))

  def body(carry, chunk):
    sums, (dkernel_t, dbias) = carry
    chunk_sums, (dx, chunk_dkernel_t, chunk_dbias) = _chunk_terms(z_loss, impl, wanted, chunk[0],
                                                                  kernel, bias, *chunk[1:])
    sums = tuple(a + b for a, b in zip(sums, chunk_sums))
    if chunk_dkernel_t is not None:
      dkernel_t = nn.with_logical_constraint(dkernel_t + chunk_dkernel_t, ('embed', 'vocab'))
    if chunk_dbias is not None:
      dbias = dbias + chunk_dbias
    return (sums, (dkernel_t, dbias)), dx

  (sums, (dkernel_t, dbias)), dx = jax.lax.scan(body, (sums_init, grads_init),
                                                (x, targets, weights))
  return sums, (dx, None if dkernel_t is None else dkernel_t.T, dbias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked_cross_entropy(z_loss, impl, x, kernel, bias, targets, weights):
  """(loss, ce, z, correct) summed over chunks; see token_cross_entropy."""
  return _scan_chunks(z_loss, impl, frozenset(), x, kernel, bias, targets, weights)[0]


def _chunked_cross_entropy_fwd(z_loss, impl, x, kernel, bias, targets, weights):
  """The sums, and the gradients of the inputs being differentiated formed alongside them."""
  value = lambda primal: None if primal is None else primal.value
  wanted = frozenset(name for name, primal in (('x', x), ('kernel', kernel), ('bias', bias))
                     if primal is not None and primal.perturbed)
  sums, grads = _scan_chunks(z_loss, impl, wanted, value(x), value(kernel), value(bias),
                             value(targets), value(weights))
  like = lambda grad, primal: None if grad is None else grad.astype(primal.value.dtype)
  return sums, tuple(like(g, p) for g, p in zip(grads, (x, kernel, bias)))


def _chunked_cross_entropy_bwd(z_loss, impl, grads, cotangents):
  del z_loss, impl
  g = cotangents[0]   # only 'loss' carries a gradient: the caller stops the other sums'
  if isinstance(g, SymbolicZero):
    return None, None, None, None, None
  return (*(None if d is None else (g * d).astype(d.dtype) for d in grads), None, None)


_chunked_cross_entropy.defvjp(_chunked_cross_entropy_fwd, _chunked_cross_entropy_bwd,
                              symbolic_zeros=True)
