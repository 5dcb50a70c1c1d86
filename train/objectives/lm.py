"""Causal language modelling over packed rows (also SFT: the batch's loss_mask picks tokens)."""

import jax.numpy as jnp

from train.objectives.base import Objective
from train.objectives.losses import token_cross_entropy


def causal_lm(model, config) -> Objective:
  """Next-token cross-entropy with optional z-loss on batch keys inputs/targets/segment_ids/
  positions/loss_mask (the data layer's 'lm' and 'sft' tasks)."""
  z_loss = config.train.z_loss

  def init_fn(rng):
    ids = jnp.zeros((1, config.data.seq_len), jnp.int32)
    return model.init({'params': rng}, ids, ids, ids + 1)['params']

  def loss_fn(params, batch, rng, *, train: bool):
    logits = model.apply({'params': params}, batch['inputs'], batch['positions'],
                         batch['segment_ids'], deterministic=not train, rngs={'dropout': rng})
    return token_cross_entropy(logits, batch['targets'], batch['loss_mask'], z_loss)

  return Objective(loss_fn=loss_fn, init_fn=init_fn)
