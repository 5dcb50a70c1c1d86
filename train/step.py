"""The train and eval steps shared by every objective (pure; jitted by the Partitioner)."""

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from model.param_tree import combine
from train.objectives.base import Objective
from train.state import TrainState


def _add(a, b):
  return jax.tree.map(jnp.add, a, b)


def _microbatches(batch: dict, n: int, shards: int) -> dict:
  """[B, ...] -> [n, B/n, ...], where micro-batch i takes the i-th slice of every batch shard's
  local rows: each device splits only the rows it holds (no cross-device reshuffle)."""
  def split(x):
    if x.shape[0] % (n * shards):
      raise ValueError(f'train.batch_size={x.shape[0]} must divide into train.grad_accum_steps='
                       f'{n} micro-batches on each of the {shards} batch shards.')
    x = x.reshape(shards, n, x.shape[0] // (shards * n), *x.shape[1:]).swapaxes(0, 1)
    x = x.reshape(n, x.shape[1] * x.shape[2], *x.shape[3:])
    return nn.with_logical_constraint(x, (None, 'batch') + (None,) * (x.ndim - 2))
  return jax.tree.map(split, batch)


def make_train_step(objective: Objective, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, seed: int, grad_accum_steps: int = 1,
                    batch_shards: int = 1) -> Callable:
  """(state, batch) -> (state, metrics). Gradients are taken with respect to the trained
  `state.params` only (the frozen ones are constants, so XLA computes no gradient for them).
  The step's RNG is fold_in(key(seed), step), so a resumed run draws exactly the numbers of
  the run that never stopped. `batch_shards` is how many ways the batch is split over devices
  (Partitioner.batch_shards)."""

  def loss_and_metrics(params, frozen, batch, rng):
    metrics = objective.loss_fn(combine(params, frozen), batch, rng, train=True)
    return metrics['loss'][0], metrics

  grad_fn = jax.grad(loss_and_metrics, has_aux=True)

  def train_step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    if grad_accum_steps == 1:
      grads, metrics = grad_fn(state.params, state.frozen, batch, rng)
    else:
      micro = _microbatches(batch, grad_accum_steps, batch_shards)

      def body(carry, xs):
        mb, i = xs
        return _add(carry, grad_fn(state.params, state.frozen, mb,
                                   jax.random.fold_in(rng, i))), None

      first = jax.tree.map(lambda x: x[0], micro)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                           jax.eval_shape(grad_fn, state.params, state.frozen, first, rng))
      (grads, metrics), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(grad_accum_steps)))
    denom = jnp.maximum(metrics['loss'][1], 1.0)
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=(optax.global_norm(grads), 1.0),
                   learning_rate=(schedule(state.step), 1.0))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(objective: Objective) -> Callable:
  """(params, batch) -> metrics, deterministic (no dropout)."""
  def eval_step(params, batch):
    return objective.loss_fn(params, batch, jax.random.key(0), train=False)
  return eval_step


def summarize(metrics: dict) -> dict[str, float]:
  """{name: (sum, count)} on host -> {name: sum / count}."""
  return {k: float(s) / max(float(c), 1e-9) for k, (s, c) in jax.device_get(metrics).items()}
