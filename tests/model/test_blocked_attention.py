"""The blocked XLA attention equals jax.nn.dot_product_attention with the dense mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.attention import attention_mask
from model.blocked_attention import blocked_attention, query_blocks

B, T, N, K, D = 2, 24, 4, 2, 8


@pytest.fixture(scope='module')
def inputs():
  r = np.random.RandomState(0)
  q, k, v = (jnp.asarray(r.randn(B, T, h, D), jnp.float32) for h in (N, K, K))
  # Row 0: two packed segments and trailing padding; row 1: one segment.
  segments = jnp.asarray([[1] * 10 + [2] * 9 + [0] * 5, [1] * T])
  bias = jnp.asarray(r.randn(1, N, T, T), jnp.float32)
  return q, k, v, segments, bias


def test_query_blocks_cover_causal_rows_once():
  assert query_blocks(10, 10, True, 4) == [(0, 4, 0, 4), (4, 8, 0, 8), (8, 10, 0, 10)]
  assert query_blocks(10, 10, False, 4) == [(0, 10, 0, 10)]
  assert query_blocks(3, 10, True, 2) == [(0, 3, 0, 10)]   # cross lengths: one block
  # a window of 3: rows 4:8 see keys 2:8 at most, rows 8:10 keys 6:10
  assert query_blocks(10, 10, True, 4, window=3) == [(0, 4, 0, 4), (4, 8, 2, 8), (8, 10, 6, 10)]


@pytest.mark.parametrize('causal,with_bias,block,window', [
    (True, False, 5, 0), (True, True, 8, 0), (False, True, 5, 0), (True, False, 64, 0),
    (True, True, 5, 7), (True, False, 4, 3), (True, False, 64, 6)])
def test_equals_dense_reference(inputs, causal, with_bias, block, window):
  q, k, v, segments, bias = inputs
  bias = bias if with_bias else None
  dense = attention_mask(segments, segments, causal, window)
  cot = jnp.asarray(np.random.RandomState(1).randn(B, T, N, D), jnp.float32)

  ref = lambda q, k, v, bias: (jax.nn.dot_product_attention(
      q, k, v, bias=bias, mask=dense) * cot).sum()
  ours = lambda q, k, v, bias: (blocked_attention(
      q, k, v, segment_ids=(segments, segments), causal=causal, window=window, bias=bias,
      block_size=block) * cot).sum()
  argnums = (0, 1, 2, 3) if with_bias else (0, 1, 2)
  want = jax.value_and_grad(ref, argnums=argnums)(q, k, v, bias)
  got = jax.value_and_grad(ours, argnums=argnums)(q, k, v, bias)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, w in zip(got[1], want[1]):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-4)
  if window:   # the window changed the function: the plain causal output differs
    plain = blocked_attention(q, k, v, segment_ids=(segments, segments), causal=True, bias=bias)
    assert not np.allclose(ours(q, k, v, bias), (plain * cot).sum(), rtol=1e-3)


def test_window_needs_causal(inputs):
  q, k, v, segments, _ = inputs
  with pytest.raises(ValueError, match='window=4 needs causal=True'):
    blocked_attention(q, k, v, segment_ids=(segments, segments), window=4)


def test_dense_mask_and_all_masked_rows(inputs):
  """A dense mask (decode's cache mask) works alone; a row with no allowed key averages all
  values and sends no gradient through its logits, like the reference."""
  q, k, v, segments, _ = inputs
  mask = attention_mask(segments, segments, causal=True).at[0, 0, 3].set(False)
  want = jax.nn.dot_product_attention(q, k, v, mask=mask)
  got = blocked_attention(q, k, v, mask=mask)
  np.testing.assert_allclose(got, want, atol=1e-5)
  np.testing.assert_allclose(got[0, 3], jnp.repeat(v[0].mean(0), N // K, axis=0), atol=1e-5)
  cot = jnp.asarray(np.random.RandomState(2).randn(B, T, N, D), jnp.float32)
  grads = lambda f: jax.grad(lambda *a: (f(*a, mask=mask) * cot).sum(), argnums=(0, 1, 2))(
      q, k, v)
  got_grads = grads(blocked_attention)
  for g, w in zip(got_grads, grads(jax.nn.dot_product_attention)):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-4)
  assert not np.any(got_grads[0][0, 3])   # the masked row's query gets no gradient
