"""model.matmul_impl='blas': MKL products through the XLA FFI handler equal XLA's, alone
(every transpose, batched, odd sizes, gradients) and in whole train steps (a LoRA decoder, and
T5 with its relative bias and cross-attention); 'auto' picks MKL only on one CPU device, and
what cannot run raises an error naming the key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import t5
from experiments.bench import random_batch
from model import host_blas
from tests.helpers import partitioner, tiny_config
from train.trainer import Experiment

pytestmark = pytest.mark.skipif(not host_blas.mkl_installed(),
                                reason='Intel MKL is not installed (pip install -e .[cpu])')


@pytest.mark.parametrize('batch', [(), (3,)])
@pytest.mark.parametrize('trans_a', [False, True])
@pytest.mark.parametrize('trans_b', [False, True])
def test_matmul_and_its_gradients_equal_xla(batch, trans_a, trans_b):
  m, k, n = 37, 19, 50   # no block of the split is a multiple of 16
  rng = np.random.RandomState(0)
  a = jnp.asarray(rng.normal(size=batch + ((k, m) if trans_a else (m, k))), jnp.float32)
  b = jnp.asarray(rng.normal(size=batch + ((n, k) if trans_b else (k, n))), jnp.float32)
  op = lambda x, t: jnp.swapaxes(x, -1, -2) if t else x
  ref = lambda a, b: op(a, trans_a) @ op(b, trans_b)
  got = lambda a, b: host_blas.matmul(a, b, trans_a, trans_b)
  np.testing.assert_allclose(jax.jit(got)(a, b), ref(a, b), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b)))
  for g, want in zip(jax.jit(jax.grad(loss(got), (0, 1)))(a, b), jax.grad(loss(ref), (0, 1))(a, b)):
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)


def _train(config, impl: str, devices: int = 1, steps: int = 3):
  """(per-step losses, final params, compiled step text) of `steps` steps of `config`."""
  config.model.matmul_impl = impl
  config.mesh.update(data=devices)
  exp = Experiment.from_config(config, jax.devices()[:devices])
  state, shardings = exp.partitioner.init(exp.init_state, jax.random.key(0))
  batch = random_batch(config, exp.partitioner.batch_sharding)
  step = exp.jit_train_step(shardings).lower(state, batch).compile()
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss'][0] / metrics['loss'][1]))
  return losses, jax.device_get(state.params), step.as_text()


@pytest.mark.parametrize('family', ['decoder_lora', 't5'])
def test_train_steps_equal_xla(family):
  make = {'decoder_lora': lambda: tiny_config(lora_rank=4, lora_targets='query,value,wi_0,wo'),
          't5': lambda: t5.get_config('tiny')}[family]
  want_losses, want_params, _ = _train(make(), 'xla')
  losses, params, text = _train(make(), 'blas')
  assert 'seedling_gemm' in text
  np.testing.assert_allclose(losses, want_losses, rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), params,
               want_params)


def test_auto_uses_mkl_on_one_cpu_device_only():
  assert 'seedling_gemm' in _train(tiny_config(), 'auto', steps=1)[2]
  assert 'seedling_gemm' not in _train(tiny_config(), 'auto', devices=2, steps=1)[2]
  assert not host_blas.uses_blas('auto', jnp.bfloat16)


def test_what_cannot_run_names_the_key():
  with pytest.raises(ValueError, match="model.matmul_impl='mkl'"):
    host_blas.uses_blas('mkl', jnp.float32)
  x = jnp.ones((4, 8), jnp.bfloat16)
  with pytest.raises(ValueError, match='float32 only'):
    host_blas.matmul(x, x.T)
  with pytest.raises(ValueError, match='contracting sizes differ'):
    host_blas.matmul(jnp.ones((4, 8)), jnp.ones((4, 8)))
  with pytest.raises(ValueError, match='one CPU device; the mesh has 2'):
    partitioner(data=2).jit(lambda a: host_blas.matmul(a, a.T))(jnp.ones((4, 8)))


def test_empty_products_are_zeros():
  assert host_blas.matmul(jnp.ones((0, 4)), jnp.ones((4, 3))).shape == (0, 3)
  np.testing.assert_array_equal(host_blas.matmul(jnp.ones((2, 0)), jnp.ones((0, 3))),
                                np.zeros((2, 3)))
