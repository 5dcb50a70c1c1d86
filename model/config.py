"""Model hyperparameters as one frozen dataclass, built from the `model` config section."""

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of every model family; a family reads the fields it needs.

  Field docs live beside the config keys in configs/; names are identical.
  """

  family: str = 'decoder'
  vocab_size: int = 512
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  mlp_dim: int = 384
  activation: str = 'swiglu'
  norm_eps: float = 1e-6
  rope_theta: float = 10_000.0
  tie_embeddings: bool = False
  qkv_bias: bool = False
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  scan_layers: bool = True
  remat_policy: str = 'none'
  attention_impl: str = 'xla'
  dropout_rate: float = 0.0

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> 'ModelConfig':
    """Builds the config, naming any key this dataclass does not know."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f'Unknown model config keys {unknown}; known keys: {sorted(known)}.')
    return cls(**values)

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)
