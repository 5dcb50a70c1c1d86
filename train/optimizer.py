"""AdamW with linear warmup and cosine decay, global-norm clipping and decoupled weight decay."""

import jax
import jax.numpy as jnp
import optax

# Parameters whose last path element is one of these are not weight-decayed (norm scales,
# biases): decay is for matrices, and with scanned layers a norm scale is 2-D, so rank can't tell.
NO_DECAY_NAMES = ('scale', 'bias')
# Parameters with one of these names are not trained by AdamW: the model defines their update as
# a surrogate gradient g (zero-valued loss term), applied as p <- p - g. This carries
# non-gradient state such as the MoE aux-loss-free router bias through the ordinary train state,
# checkpoints and micro-batch accumulation.
SURROGATE_UPDATE_NAMES = ('router_bias',)


def make_schedule(train) -> optax.Schedule:
  """Warmup from 0 to `train.learning_rate`, then cosine to `min_lr_ratio` of it."""
  decay_steps = train.steps if train.decay_steps == -1 else train.decay_steps
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train.learning_rate, warmup_steps=train.warmup_steps,
      decay_steps=max(decay_steps, train.warmup_steps + 1),
      end_value=train.learning_rate * train.min_lr_ratio)


def decay_mask(params):
  """True for parameters that get weight decay."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) not in NO_DECAY_NAMES, params)


def _last_name(path):
  return next((k.key for k in reversed(path) if hasattr(k, 'key')), None)


def with_surrogate_updates(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` for every parameter but those named in SURROGATE_UPDATE_NAMES, whose update is
  minus their gradient; `inner` sees zeros for them (so they do not enter clipping norms)."""
  def update(grads, state, params=None):
    surrogate = jax.tree_util.tree_map_with_path(
        lambda path, _: _last_name(path) in SURROGATE_UPDATE_NAMES, grads)
    masked = jax.tree.map(lambda g, s: jnp.zeros_like(g) if s else g, grads, surrogate)
    updates, state = inner.update(masked, state, params)
    return jax.tree.map(lambda u, g, s: -g if s else u, updates, grads, surrogate), state
  return optax.GradientTransformation(inner.init, update)


def make_optimizer(train) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer of the `train` config section, and its learning-rate schedule."""
  schedule = make_schedule(train)
  parts = [optax.clip_by_global_norm(train.grad_clip_norm)] if train.grad_clip_norm > 0 else []
  parts.append(optax.adamw(schedule, b1=train.b1, b2=train.b2, eps=train.eps,
                           weight_decay=train.weight_decay, mask=decay_mask))
  return with_surrogate_updates(optax.chain(*parts)), schedule
