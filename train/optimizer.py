"""AdamW with linear warmup and cosine decay, global-norm clipping and decoupled weight decay."""

import jax
import optax

# Parameters whose last path element is one of these are not weight-decayed (norm scales,
# biases): decay is for matrices, and with scanned layers a norm scale is 2-D, so rank can't tell.
NO_DECAY_NAMES = ('scale', 'bias')


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


def make_optimizer(train) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer of the `train` config section, and its learning-rate schedule."""
  schedule = make_schedule(train)
  parts = [optax.clip_by_global_norm(train.grad_clip_norm)] if train.grad_clip_norm > 0 else []
  parts.append(optax.adamw(schedule, b1=train.b1, b2=train.b2, eps=train.eps,
                           weight_decay=train.weight_decay, mask=decay_mask))
  return optax.chain(*parts), schedule
