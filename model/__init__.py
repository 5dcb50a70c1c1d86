"""Pure Flax linen models. They name logical axes only; train/sharding.py owns the mesh."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from model import lora
from model.config import ModelConfig
from model.decoder import Decoder
from model.encoder import EncoderMLM, check_encoder_only
from model.layers import Projection
from model.t5 import T5

FAMILIES = {'decoder': Decoder, 't5': T5, 'encoder': EncoderMLM}


def build_model(cfg: ModelConfig):
  """The linen module for `cfg.family`."""
  if cfg.family not in FAMILIES:
    raise ValueError(f'model.family={cfg.family!r}; choose one of {sorted(FAMILIES)}.')
  check_encoder_only(cfg)
  lora.check_config(cfg, projection_names)
  return FAMILIES[cfg.family](cfg)


def init_inputs(cfg: ModelConfig) -> tuple:
  """Smallest inputs that initialise `cfg`'s model (ids, positions, segment ids; twice for T5)."""
  ids = jnp.zeros((1, 1), jnp.int32)
  return (ids, ids, ids + 1) * (2 if cfg.family == 't5' else 1)


@functools.lru_cache(maxsize=None)
def projection_names(cfg: ModelConfig) -> frozenset[str]:
  """Names of the Projections in `cfg`'s model (what model.lora_targets may name), recorded
  while its init is traced (nothing is computed); once per config."""
  names = set()

  def record(call, args, kwargs, context):
    if isinstance(context.module, Projection):
      names.add(context.module.name)
    return call(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(FAMILIES[cfg.family](cfg).init, jax.random.key(0), *init_inputs(cfg))
  return frozenset(names)
