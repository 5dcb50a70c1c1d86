"""Masked language modelling (BERT 80/10/10 masking is done by the data layer's 'mlm' task)."""

import jax.numpy as jnp

from train.objectives.base import Objective
from train.objectives.losses import token_cross_entropy


def masked_lm(model, config) -> Objective:
  """Cross-entropy of the original token at the masked positions only (batch loss_mask), on
  the 'mlm' batch keys inputs/targets/segment_ids/positions/loss_mask; 'accuracy' is the
  masked-token accuracy."""
  z_loss, chunk_tokens = config.train.z_loss, config.train.loss_chunk_tokens

  def init_fn(rng):
    ids = jnp.zeros((1, config.data.seq_len), jnp.int32)
    return model.init({'params': rng}, ids, ids, ids + 1)['params']

  def loss_fn(params, batch, rng, *, train: bool):
    head = model.apply({'params': params}, batch['inputs'], batch['positions'],
                       batch['segment_ids'], deterministic=not train, return_head=True,
                       rngs={'dropout': rng})
    return token_cross_entropy(head, batch['targets'], batch['loss_mask'], z_loss, chunk_tokens)

  return Objective(loss_fn=loss_fn, init_fn=init_fn)
