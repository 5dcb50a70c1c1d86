"""The train state: step, trainable parameters and optimizer state, one pytree."""

from typing import Any

import flax.struct
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: Any
  params: Any
  opt_state: Any

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation) -> 'TrainState':
    """Step 0. `params` may be logically boxed; the optimizer state mirrors their boxes."""
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
