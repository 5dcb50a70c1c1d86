"""Pure Flax linen models. They name logical axes only; train/sharding.py owns the mesh."""

from model.config import ModelConfig
from model.decoder import Decoder
from model.encoder import EncoderMLM, check_encoder_only
from model.t5 import T5

FAMILIES = {'decoder': Decoder, 't5': T5, 'encoder': EncoderMLM}


def build_model(cfg: ModelConfig):
  """The linen module for `cfg.family`."""
  if cfg.family not in FAMILIES:
    raise ValueError(f'model.family={cfg.family!r}; choose one of {sorted(FAMILIES)}.')
  check_encoder_only(cfg)
  return FAMILIES[cfg.family](cfg)
