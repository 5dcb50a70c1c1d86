"""attention_impl variants: each equals the XLA default (outputs and gradients, packed segments,
grouped KV heads, sharded over batch and heads) where it can run; elsewhere a clear error at
trace time (and the comparison is skipped with the reason). 'pallas_interpret' runs the TPU
splash kernel in Pallas' interpreter, so the kernel and its shard_map wiring are checked on CPU."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.attention import (IMPLEMENTATIONS, Attention, attention_mask, check_implementation,
                             layer_mask)
from model.config import ModelConfig
from model.pallas_attention import block_size
from tests.helpers import partitioner

CFG = ModelConfig(d_model=64, num_heads=8, num_kv_heads=4, head_dim=8)   # 2 KV heads a shard
LENGTH = 128   # the splash kernel's smallest tile


def _attend(cfg, x, seg, mask=None, params=None):
  """Attention(cfg) output on x with causal packed-segment masking; params from init if None."""
  layer = Attention(cfg)
  pos = jnp.broadcast_to(jnp.arange(x.shape[1]), seg.shape)
  mask = layer_mask(cfg, seg, seg, causal=True) if mask is None else mask
  if params is None:
    params = layer.init(jax.random.key(0), x, x, mask, pos, pos)
  return layer.apply(params, x, x, mask, pos, pos), params


def _outputs_and_grads(cfg, params, x, seg, cotangent):
  """(output, d<output, cotangent>/d(params, x)), jitted over data=2 x tensor=2 where there are
  4 devices (batch and heads split), else over every device as data."""
  n = len(jax.devices())
  part = partitioner(data=2, tensor=2) if n >= 4 else partitioner(data=n)

  def run(params, x):
    out, vjp = jax.vjp(lambda p, x: _attend(cfg, x, seg, params=p)[0], params, x)
    return out, vjp(cotangent)

  return part.jit(run)(params, x)


@pytest.mark.parametrize('impl', sorted(set(IMPLEMENTATIONS) - {'xla'}))
def test_implementation_equals_xla_default(impl):
  backends, dtypes = IMPLEMENTATIONS[impl]
  if backends is not None and jax.default_backend() not in backends:
    pytest.skip(f'attention_impl={impl!r} needs a {backends} backend; this is '
                f'{jax.default_backend()!r}')
  dtype = dtypes[0] if dtypes else 'float32'
  cfg = dataclasses.replace(CFG, dtype=dtype)
  k1, k2 = jax.random.split(jax.random.key(1))
  x = jax.random.normal(k1, (2, LENGTH, cfg.d_model)).astype(dtype)
  # Row 0 packs three documents and padding; row 1 is one document and padding.
  seg = jnp.asarray([[1] * 50 + [2] * 60 + [3] * 10 + [0] * 8, [1] * 100 + [0] * 28])
  cotangent = jax.random.normal(k2, x.shape).astype(dtype)
  params = jax.jit(lambda x: _attend(cfg, x, seg)[1])(x)   # eager init compiles op by op
  ref, ref_grads = _outputs_and_grads(cfg, params, x, seg, cotangent)
  out, grads = _outputs_and_grads(dataclasses.replace(cfg, attention_impl=impl), params, x, seg,
                                  cotangent)
  tol = 1e-4 if dtype == 'float32' else 2e-2
  for got, want in zip(jax.tree.leaves((out, grads)), jax.tree.leaves((ref, ref_grads))):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol)
  assert float(jnp.abs(grads[1]).max()) > 0.1   # the input gradients are not trivially zero


def test_unrunnable_choices_fail_clearly():
  with pytest.raises(ValueError, match="attention_impl='cudnn' runs on"):
    check_implementation(dataclasses.replace(CFG, attention_impl='cudnn', dtype='bfloat16'), 'cpu')
  with pytest.raises(ValueError, match='needs model.dtype'):
    check_implementation(dataclasses.replace(CFG, attention_impl='cudnn'), 'gpu')
  with pytest.raises(ValueError, match='choose one of'):
    check_implementation(dataclasses.replace(CFG, attention_impl='flash'), 'cpu')
  with pytest.raises(ValueError, match=r"'pallas' runs on \('tpu',\).*'pallas_interpret', 'xla'"):
    check_implementation(dataclasses.replace(CFG, attention_impl='pallas'), 'cpu')
  x = jnp.zeros((1, 8, CFG.d_model))
  seg = jnp.ones((1, 8), jnp.int32)
  trace = lambda cfg, mask=None: jax.eval_shape(lambda: _attend(cfg, x, seg, mask))
  with pytest.raises(ValueError, match='cudnn'):
    trace(dataclasses.replace(CFG, attention_impl='cudnn', dtype='bfloat16'))
  interpret = dataclasses.replace(CFG, attention_impl='pallas_interpret')
  with pytest.raises(ValueError, match='multiples of 128, got 8; change data.seq_len'):
    trace(interpret)
  with pytest.raises(ValueError, match='has a dense mask'):
    trace(interpret, attention_mask(seg, seg, causal=True))
  with pytest.raises(ValueError, match='has a sliding window'):
    trace(dataclasses.replace(interpret, attention_window=4))
  with pytest.raises(ValueError, match='attention_block_size=200 must be a multiple of 128'):
    block_size(LENGTH, 200)
  assert block_size(640, 512) == 128 and block_size(1024, 512) == 512
