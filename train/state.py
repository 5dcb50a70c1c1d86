"""The train state: step, trained parameters, frozen parameters and optimizer state, one pytree."""

from typing import Any, Callable

import flax.struct
import jax.numpy as jnp
import optax

from model.param_tree import combine, partition


@flax.struct.dataclass
class TrainState:
  step: Any
  params: Any      # the parameters the optimizer trains
  frozen: Any      # parameters carried but not trained (LoRA's base weights); {} when none
  opt_state: Any   # optimizer state of `params` only

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation,
             trains: Callable[[tuple], bool]) -> 'TrainState':
    """Step 0 from all model `params`, split by the predicate `trains` (train/trainable.py)
    on each path. `params` may be logically boxed; the optimizer state mirrors their boxes."""
    trained, frozen = partition(params, trains)
    return cls(step=jnp.zeros((), jnp.int32), params=trained, frozen=frozen,
               opt_state=tx.init(trained))

  def model_params(self):
    """Trained and frozen parameters together: what the model applies (also on a state of
    shardings or ShapeDtypeStructs)."""
    return combine(self.params, self.frozen)
