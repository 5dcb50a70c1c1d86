"""attention_impl variants: each equals the XLA default where it can run; elsewhere a clear
error at trace time (and the comparison is skipped with the reason)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.attention import IMPLEMENTATIONS, Attention, attention_mask, check_implementation
from model.config import ModelConfig

CFG = ModelConfig(d_model=64, num_heads=4, num_kv_heads=2, head_dim=16)


def _attend(cfg, x, seg, params=None):
  layer = Attention(cfg)
  pos = jnp.broadcast_to(jnp.arange(x.shape[1]), seg.shape)
  mask = attention_mask(seg, seg, causal=True)
  if params is None:
    params = layer.init(jax.random.key(0), x, x, mask, pos, pos)
  return layer.apply(params, x, x, mask, pos, pos), params


@pytest.mark.parametrize('impl', sorted(set(IMPLEMENTATIONS) - {'xla'}))
def test_implementation_equals_xla_default(impl):
  backends, dtypes = IMPLEMENTATIONS[impl]
  if backends is not None and jax.default_backend() not in backends:
    pytest.skip(f'attention_impl={impl!r} needs a {backends} backend; this is '
                f'{jax.default_backend()!r}')
  dtype = dtypes[0] if dtypes else 'float32'
  cfg = dataclasses.replace(CFG, dtype=dtype)
  x = jax.random.normal(jax.random.key(1), (2, 32, cfg.d_model)).astype(dtype)
  seg = jnp.asarray(np.repeat([[1] * 20 + [2] * 12], 2, axis=0))
  ref, params = _attend(cfg, x, seg)
  out, _ = _attend(dataclasses.replace(cfg, attention_impl=impl), x, seg, params)
  tol = 1e-5 if dtype == 'float32' else 2e-2
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             rtol=tol, atol=tol)


def test_cudnn_off_gpu_and_unknown_names_fail_clearly():
  with pytest.raises(ValueError, match="attention_impl='cudnn' runs on"):
    check_implementation(dataclasses.replace(CFG, attention_impl='cudnn', dtype='bfloat16'), 'cpu')
  with pytest.raises(ValueError, match='needs model.dtype'):
    check_implementation(dataclasses.replace(CFG, attention_impl='cudnn'), 'gpu')
  with pytest.raises(ValueError, match='choose one of'):
    check_implementation(dataclasses.replace(CFG, attention_impl='flash'), 'cpu')
  x = jnp.zeros((1, 8, CFG.d_model))
  with pytest.raises(ValueError, match='cudnn'):
    _attend(dataclasses.replace(CFG, attention_impl='cudnn', dtype='bfloat16'), x,
            jnp.ones((1, 8), jnp.int32))
