"""LoRA training through the shared step: only the adapters train and have optimizer moments,
the base weights stay bitwise, the compiled step computes no base-weight gradient, a sharded
step equals one device, and checkpoints round-trip the trained and frozen parts.

Initial weights are drawn on the host from the state's shapes (no init is compiled)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.lora import is_adapter, split_adapters
from tests.helpers import packed_batch, tiny_config
from train.checkpoint import Checkpointer
from train.state import TrainState
from train.step import summarize
from train.trainer import Experiment

TARGETS = 'query,key,value,out,wi_0,wi_1,wo'
STEPS = 4


def _config(**model):
  config = tiny_config(**model)
  # A large Adam eps keeps updates smooth in g: with a tiny one, float noise in near-zero
  # gradients becomes full-size steps and sharded and single-device runs drift apart.
  config.train.update(learning_rate=3e-2, warmup_steps=0, grad_clip_norm=0.0, eps=1e-3)
  return config


def _lora_config():
  return _config(lora_rank=4, lora_alpha=8.0, lora_targets=TARGETS)


def _experiment(config, **mesh):
  config.mesh.update(dict(data=1, **mesh))
  n = int(np.prod(list(mesh.values()) or [1]))
  return Experiment.from_config(config, jax.devices()[:n])


def _initial_state(exp):
  """A step-0 state around host-drawn weights (lora_b zero, as a fresh adapter), placed in
  the experiment's shardings."""
  abstract, shardings = exp.partitioner.abstract(exp.init_state, jax.random.key(0))
  rng = np.random.RandomState(0)

  def draw(path, s):
    if path[-1].key == 'lora_b':
      return jnp.zeros(s.shape, s.dtype)
    if s.dtype == jnp.uint8:   # NF4 codes: two random 4-bit levels a byte
      return jnp.asarray(rng.randint(0, 256, s.shape), s.dtype)
    return jnp.asarray(np.abs(rng.normal(0, 0.1, s.shape)) if path[-1].key == 'kernel_absmax'
                       else rng.normal(0, 0.1, s.shape), s.dtype)

  params = jax.tree_util.tree_map_with_path(draw, abstract.model_params())
  state = TrainState.create(params, exp.tx, exp.trains)
  return jax.device_put(state, shardings), abstract, shardings


def _train(exp, evaluate=False) -> types.SimpleNamespace:
  """STEPS steps on one batch: the initial state (on host), final state, losses, compiled
  step and, if `evaluate`, the eval step's loss on the initial params."""
  state, abstract, shardings = _initial_state(exp)
  run = types.SimpleNamespace(initial=jax.device_get(state), losses=[])
  batch = jax.device_put(packed_batch(8, 16, 128), exp.partitioner.batch_sharding)
  if evaluate:
    run.eval_loss = summarize(exp.jit_eval_step(shardings.model_params())(
        state.model_params(), batch))['loss']
  step = exp.jit_train_step(shardings)
  run.compiled = step.lower(abstract, batch).compile()
  for _ in range(STEPS):
    state, metrics = step(state, batch)
    run.losses.append(summarize(metrics)['loss'])
  run.state = state
  return run


def _paths(tree):
  return [tuple(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


@pytest.fixture(scope='module')
def single():
  return _train(_experiment(_lora_config()), evaluate=True)


def test_lora_steps_train_the_adapters_only(single):
  initial, state, losses = single.initial, single.state, single.losses
  assert all(b < a - 5e-3 for a, b in zip(losses, losses[1:])), losses   # random targets
  np.testing.assert_allclose(single.eval_loss, losses[0], rtol=1e-6)   # eval sees the adapters
  assert initial.frozen and all(is_adapter(p) for p in _paths(initial.params))
  assert not any(is_adapter(p) for p in _paths(initial.frozen))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen), initial.frozen)
  for before, after in zip(jax.tree.leaves(initial.params), jax.tree.leaves(state.params)):
    assert np.abs(np.asarray(after) - before).max() > 1e-4   # lora_a and lora_b both moved
  # Adam moments exist for the adapters only: two per trained element, none for base weights.
  moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
  assert moments == 2 * sum(x.size for x in jax.tree.leaves(state.params))


def test_compiled_lora_step_computes_no_base_weight_gradient(single):
  exp = _experiment(_config())
  abstract, shardings = exp.partitioner.abstract(exp.init_state, jax.random.key(0))
  batch = jax.eval_shape(lambda: packed_batch(8, 16, 128))
  full_step = exp.jit_train_step(shardings).lower(abstract, batch).compile()
  lora_flops = single.compiled.cost_analysis()['flops']
  full_flops = full_step.cost_analysis()['flops']
  # Weight gradients are about a third of a full step's matmul FLOPs; the adapters add ~3%.
  assert lora_flops < 0.8 * full_flops, (lora_flops, full_flops)


def test_sharded_lora_step_equals_single_device(single):
  sharded = _train(_experiment(_lora_config(), fsdp=4, tensor=2))
  state, want = sharded.state, single.state
  assert any(not a.sharding.is_fully_replicated for a in jax.tree.leaves(state.params))
  np.testing.assert_allclose(sharded.losses, single.losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               jax.device_get(state.params), jax.device_get(want.params))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen),
               jax.device_get(want.frozen))


def test_checkpoint_round_trips_trained_and_frozen_parts(single, tmp_path):
  state = single.state
  exp = _experiment(_lora_config(), fsdp=2, tensor=2)   # restored onto another mesh
  abstract, _ = exp.partitioner.abstract(exp.init_state, jax.random.key(0))
  ckpt = Checkpointer(str(tmp_path), every_steps=1, keep=1, async_save=False)
  ckpt.save(STEPS, state, {'position': 3}, force=True)
  restored, data_state = ckpt.restore(STEPS, abstract)
  ckpt.close()
  assert data_state == {'position': 3}
  adapters, base = split_adapters(restored.model_params())
  assert jax.tree.structure(adapters) == jax.tree.structure(state.params)
  assert jax.tree.structure(base) == jax.tree.structure(state.frozen)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored),
               jax.device_get(state))


def test_qlora_trains_the_adapters_over_frozen_nf4_kernels():
  config = _config(lora_rank=4, lora_alpha=8.0, lora_targets=TARGETS, lora_quant='nf4',
                   lora_quant_block=8)
  run = _train(_experiment(config, fsdp=2, tensor=2))
  assert all(b < a for a, b in zip(run.losses, run.losses[1:])), run.losses
  assert run.losses[-1] < run.losses[0] - 5e-3, run.losses
  frozen = jax.device_get(run.state.frozen)
  assert [p for p in _paths(frozen) if p[-1] == 'kernel'] == [('lm_head', 'kernel')]
  codes = [x for p, x in zip(_paths(frozen), jax.tree.leaves(frozen)) if p[-1] == 'kernel_nf4']
  assert len(codes) == 7 and all(c.dtype == np.uint8 for c in codes)   # every projection
  jax.tree.map(np.testing.assert_array_equal, frozen, run.initial.frozen)
  config.model.lora_rank, config.model.lora_targets = 0, ''
  with pytest.raises(ValueError, match="lora_quant='nf4' stores the kernels frozen"):
    _experiment(config, fsdp=2, tensor=2)


def test_lora_refuses_a_router_bias_it_would_freeze():
  config = _lora_config()
  config.model.update(num_experts=4, router_bias_update_rate=1e-3, lora_targets='query')
  with pytest.raises(ValueError, match='router_bias_update_rate=0.001 moves the router bias'):
    Experiment.from_config(config)
