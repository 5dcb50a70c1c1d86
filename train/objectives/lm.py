"""Causal language modelling over packed rows (also SFT: the batch's loss_mask picks tokens)."""

import jax.numpy as jnp

from model.moe import MOE_COLLECTION, moe_metrics
from train.objectives.base import Objective
from train.objectives.losses import token_cross_entropy


def causal_lm(model, config) -> Objective:
  """Next-token cross-entropy with optional z-loss on batch keys inputs/targets/segment_ids/
  positions/loss_mask (the data layer's 'lm' and 'sft' tasks)."""
  z_loss, chunk_tokens = config.train.z_loss, config.train.loss_chunk_tokens

  def init_fn(rng):
    ids = jnp.zeros((1, config.data.seq_len), jnp.int32)
    return model.init({'params': rng}, ids, ids, ids + 1)['params']

  def loss_fn(params, batch, rng, *, train: bool):
    head, stats = model.apply({'params': params}, batch['inputs'], batch['positions'],
                              batch['segment_ids'], deterministic=not train, return_head=True,
                              rngs={'dropout': rng}, mutable=[MOE_COLLECTION])
    metrics = token_cross_entropy(head, batch['targets'], batch['loss_mask'], z_loss,
                                  chunk_tokens)
    moe = moe_metrics(stats)
    if moe:   # MoE aux losses are per-token means: weight them by the loss's token count
      loss, count = metrics['loss']
      metrics['loss'] = (loss + moe['moe_aux_loss'][0] * count, count)
    return {**metrics, **moe}

  return Objective(loss_fn=loss_fn, init_fn=init_fn)
