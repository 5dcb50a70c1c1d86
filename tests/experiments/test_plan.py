"""The planner's numbers against the real thing: initialized parameters and XLA's memory
analysis of the compiled step."""

import math

import jax
import pytest

from experiments.plan import main as plan_main, param_counts, plan
from tests.helpers import tiny_config
from train.trainer import Experiment


def _tiny(**mesh):
  c = tiny_config()
  c.mesh.update(**mesh)
  return c


@pytest.fixture(scope='module')
def sharded_plan():
  config = _tiny(data=2, fsdp=2, tensor=2)
  return config, plan(config, device='h100')


def test_param_count_equals_initialized_params(sharded_plan):
  config, p = sharded_plan
  exp = Experiment.from_config(config)
  params, _ = exp.partitioner.init(lambda r: exp.objective.init_fn(r), jax.random.key(0))
  real = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  assert p['params_total'] == p['params_active'] == real


def test_memory_within_ten_percent_of_compiled_analysis(sharded_plan):
  _, p = sharded_plan
  m = p['per_device_bytes']
  state_and_batch = m['params'] + m['optimizer_state'] + m['batch']
  assert abs(state_and_batch - m['compiled_arguments']) <= 0.1 * m['compiled_arguments']
  assert m['compiled_peak'] >= m['compiled_arguments']


def test_sharding_divides_per_device_params(sharded_plan):
  _, p = sharded_plan   # f32 params, most split 4 ways over fsdp x tensor
  full = 4 * p['params_total']
  assert full / 4 <= p['per_device_bytes']['params'] < full / 3
  assert p['per_device_bytes']['optimizer_state'] >= 2 * p['per_device_bytes']['params']


def test_fits_verdict_and_bad_device(sharded_plan, capsys):
  assert sharded_plan[1]['fits'] and sharded_plan[1]['device_memory_bytes'] == 80 * 2 ** 30
  with pytest.raises(ValueError, match='DEVICE_MEMORY_BYTES'):
    plan_main(_tiny(), device='abacus')


def test_batch_that_does_not_split_fails_before_compiling():
  config = _tiny(data=8)
  config.train.batch_size = 12
  with pytest.raises(ValueError, match='train.batch_size=12 does not split over the 8 batch'):
    plan(config)


def test_moe_active_params_count_top_k_experts():
  config = _tiny()
  config.model.update(num_experts=4, num_experts_per_tok=1)
  total, active = param_counts(Experiment.from_config(config), jax.random.key(0))
  m = config.model
  routed = m.num_layers * m.num_experts * 3 * m.d_model * m.mlp_dim   # swiglu wi_0, wi_1, wo
  assert total - active == routed * 3 // 4


def test_qlora_counts_the_quantized_weights():
  config = tiny_config(lora_rank=4, lora_targets='query,wo')
  lora = param_counts(Experiment.from_config(config), jax.random.key(0))
  config.model.update(lora_quant='nf4', lora_quant_block=8)
  assert param_counts(Experiment.from_config(config), jax.random.key(0)) == lora
