"""The training loop: model + objective + data -> updated, checkpointed, logged state."""

import dataclasses
import os
import time

import flax.linen as nn
import jax
from absl import logging

from data.pipeline import build_pipeline, target_length
from model import ModelConfig, build_model
from model.flops import flops_per_token
from model.hf import init_params
from model.lora import split_adapters
from model.param_tree import combine
from train.checkpoint import Checkpointer
from train.hardware import peak_flops
from train.metrics import MetricsWriter
from train.objectives import build_objective
from train.optimizer import make_optimizer
from train.sharding import Partitioner
from train.state import TrainState
from train.step import make_eval_step, make_train_step, summarize
from train.trainable import trainable


@dataclasses.dataclass
class Experiment:
  """Everything a loop needs, built once from a config (also used by eval and the planner)."""
  config: object
  partitioner: Partitioner
  model_cfg: ModelConfig
  model: object
  objective: object
  tx: object
  schedule: object
  trains: object     # path -> whether the optimizer trains that parameter (train/trainable.py)

  @classmethod
  def from_config(cls, config, devices=None) -> 'Experiment':
    model_cfg = ModelConfig.from_dict(config.model.to_dict())
    model = build_model(model_cfg)
    tx, schedule = make_optimizer(config.train)
    return cls(config, Partitioner.from_config(config, devices), model_cfg, model,
               build_objective(config.objective.name, model, config), tx, schedule,
               trainable(config))

  def init_state(self, rng) -> TrainState:
    """Logically boxed step-0 state (traced under eval_shape or jit by the Partitioner)."""
    return TrainState.create(self.objective.init_fn(rng), self.tx, self.trains)

  def jit_state_from_params(self, state_shardings):
    """(loaded, rng) -> step-0 state around the `loaded` params (init_from: every parameter
    but the LoRA adapters). The adapters are initialised from `rng` as a random init would
    draw them; XLA drops the rest of that init, so no other random parameter is made. The
    loaded params are donated, so the peak is params + optimizer state."""
    def create(loaded, rng):
      adapters, _ = split_adapters(nn.meta.unbox(self.objective.init_fn(rng)))
      return TrainState.create(combine(loaded, adapters), self.tx, self.trains)
    _, loaded_shardings = split_adapters(state_shardings.model_params())
    return self.partitioner.jit(create, in_shardings=(loaded_shardings, None),
                                out_shardings=state_shardings, donate_argnums=(0,))

  def jit_train_step(self, state_shardings):
    c = self.config
    step = make_train_step(self.objective, self.tx, self.schedule, seed=c.seed,
                           grad_accum_steps=c.train.grad_accum_steps,
                           batch_shards=self.partitioner.batch_shards)
    batch = self.partitioner.batch_sharding
    return self.partitioner.jit(step, in_shardings=(state_shardings, batch),
                                out_shardings=(state_shardings, None), donate_argnums=(0,))

  def jit_eval_step(self, param_shardings):
    return self.partitioner.jit(make_eval_step(self.objective),
                                in_shardings=(param_shardings, self.partitioner.batch_sharding))

  def flops_per_token(self) -> float:
    """Model training FLOPs per (encoder) token at the config's lengths (model/flops.py): span
    corruption's decoder length counts; prefix-LM's decoder spans the whole row."""
    c = self.config
    decoder_len = target_length(c) if c.data.task == 'span_corruption' else 0
    return flops_per_token(self.model_cfg, c.data.seq_len, decoder_len)

  def jit_decode_step(self, param_shardings):
    """(params, batch) -> greedy-decoding metrics of the objective's `decode_fn`."""
    if self.objective.decode_fn is None:
      raise ValueError(f'train.eval_decode_batches={self.config.train.eval_decode_batches} '
                       f'needs an encoder-decoder objective (span_corruption, prefix_lm), not '
                       f'objective.name={self.config.objective.name!r}; set it to 0.')
    # key(0): the eval step's RNG, so prefix-LM decodes the split whose loss is reported.
    step = lambda params, batch: self.objective.decode_fn(params, batch, jax.random.key(0))
    return self.partitioner.jit(step, in_shardings=(param_shardings,
                                                    self.partitioner.batch_sharding))


def _evaluate(exp: Experiment, eval_step, params, decode_step=None) -> dict:
  """Mean metrics over the first `train.eval_batches` batches of the eval split, and with
  `decode_step` its metrics over the first `train.eval_decode_batches` batches."""
  c = exp.config.train
  pipeline = build_pipeline(exp.config, exp.partitioner.batch_sharding, split='test',
                            model_vocab_size=exp.model_cfg.vocab_size)
  decode_batches = c.eval_decode_batches if decode_step is not None else 0
  accumulate = lambda total, m: m if total is None else jax.tree.map(lambda a, b: a + b, total, m)
  losses = decoded = None
  for i, batch in zip(range(max(c.eval_batches, decode_batches)), pipeline):
    if i < c.eval_batches:
      losses = accumulate(losses, eval_step(params, batch))
    if i < decode_batches:
      decoded = accumulate(decoded, decode_step(params, batch))
  return {f'eval_{k}': v for k, v in summarize({**(losses or {}), **(decoded or {})}).items()}


def train(config, workdir: str) -> TrainState:
  """Trains `config` in `workdir`, resuming from its newest checkpoint if there is one."""
  c = config
  is_main = jax.process_index() == 0
  exp = Experiment.from_config(c)
  rng = jax.random.key(c.seed)
  abstract, shardings = exp.partitioner.abstract(exp.init_state, rng)
  replicated = exp.partitioner.replicated_params(shardings.model_params(),
                                                 abstract.model_params())
  if replicated:
    logging.warning('Parameters replicated on a sharded mesh %s: %s',
                    dict(exp.partitioner.mesh.shape), ', '.join(replicated))
  pipeline = build_pipeline(c, exp.partitioner.batch_sharding, split='train',
                            model_vocab_size=exp.model_cfg.vocab_size)
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), c.checkpoint.every_steps,
                      c.checkpoint.keep, c.checkpoint.async_save)
  start = ckpt.latest_step()
  if start is None:
    start = 0
    if c.init_from:
      params = init_params(c.init_from, exp.model_cfg, shardings.model_params())
      state = exp.jit_state_from_params(shardings)(params, rng)
    else:
      state, _ = exp.partitioner.init(exp.init_state, rng)
  else:
    state, data_state = ckpt.restore(start, abstract)
    pipeline.set_state(data_state)
    logging.info('Resumed from step %d.', start)
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(c.to_json_best_effort(indent=2))

  train_step = exp.jit_train_step(shardings)
  param_shardings = shardings.model_params()
  eval_step = exp.jit_eval_step(param_shardings) if c.train.eval_every_steps > 0 else None
  decode_step = (exp.jit_decode_step(param_shardings)
                 if eval_step is not None and c.train.eval_decode_batches > 0 else None)
  tokens_per_step = c.train.batch_size * c.data.seq_len
  model_flops = exp.flops_per_token()
  peak = peak_flops(exp.partitioner.mesh.devices.flat)
  writer = MetricsWriter(workdir, c.train.steps, start, is_main)
  timer, timed_steps = None, 0
  for step in range(start, c.train.steps):
    state, metrics = train_step(state, next(pipeline))
    done = step + 1
    if timer is None:   # the first step of a process includes compilation: time from after it
      jax.block_until_ready(state)
      timer = time.perf_counter()
    else:
      timed_steps += 1
    if done % c.train.log_every_steps == 0 or done == c.train.steps:
      values = summarize(metrics)   # device -> host: the only sync in the loop
      if timed_steps:
        tokens_per_s = timed_steps * tokens_per_step / (time.perf_counter() - timer)
        values.update(tokens_per_s=tokens_per_s, mfu=tokens_per_s * model_flops / peak)
        timer, timed_steps = time.perf_counter(), 0
      if eval_step is not None and done % c.train.eval_every_steps == 0:
        values.update(_evaluate(exp, eval_step, state.model_params(), decode_step))
        timer = time.perf_counter()   # evaluation (and its compile) is not training throughput
      writer.write(done, values)
    if ckpt.should_save(done) or done == c.train.steps:
      ckpt.save(done, state, pipeline.get_state(), force=True)
  ckpt.close()
  writer.close()
  return state
