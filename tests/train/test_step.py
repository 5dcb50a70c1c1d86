"""The shared train step: gradient accumulation is exact, schedule and clipping behave."""

import jax
import numpy as np

from model import ModelConfig, build_model
from tests.helpers import packed_batch, partitioner, tiny_config
from train.objectives import build_objective
from train.optimizer import make_optimizer, make_schedule
from train.state import TrainState
from train.step import make_train_step, summarize
from train.trainable import trainable


def _one_step(config, batch):
  model = build_model(ModelConfig.from_dict(config.model.to_dict()))
  objective = build_objective('causal_lm', model, config)
  tx, schedule = make_optimizer(config.train)
  part = partitioner(data=2, fsdp=2)
  state, shardings = part.init(
      lambda r: TrainState.create(objective.init_fn(r), tx, trainable(config)), jax.random.key(0))
  step = part.jit(make_train_step(objective, tx, schedule, seed=0,
                                  grad_accum_steps=config.train.grad_accum_steps,
                                  batch_shards=part.batch_shards),
                  in_shardings=(shardings, part.batch_sharding), out_shardings=(shardings, None))
  return step(state, jax.device_put(batch, part.batch_sharding))


def test_gradient_accumulation_equals_the_full_batch():
  config = tiny_config()
  # A large Adam eps keeps the first update smooth in g (with a tiny eps it is lr * sign(g),
  # which turns float noise in near-zero gradients into full-size differences).
  config.train.update(learning_rate=1e-2, warmup_steps=0, eps=1e-3)
  batch = packed_batch(8, config.data.seq_len, config.model.vocab_size)
  # Unequal token counts per micro-batch: accumulation must weight by tokens, not average means.
  batch['loss_mask'] = batch['loss_mask'].at[1::4, 5:].set(0)
  full_state, full_metrics = _one_step(config, batch)
  config.train.grad_accum_steps = 2
  acc_state, acc_metrics = _one_step(config, batch)
  np.testing.assert_allclose(summarize(acc_metrics)['loss'], summarize(full_metrics)['loss'],
                             rtol=1e-6)
  for a, b in zip(jax.tree.leaves(acc_state.params), jax.tree.leaves(full_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert int(acc_state.step) == 1


def test_schedule_warms_up_then_decays_to_the_floor():
  train = tiny_config().train
  train.update(learning_rate=1.0, warmup_steps=10, steps=100, min_lr_ratio=0.1)
  schedule = make_schedule(train)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(10)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(100)), 0.1, rtol=1e-5)
  assert float(schedule(50)) < float(schedule(20))
