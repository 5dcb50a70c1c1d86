"""The objective contract every loss function in train/ and align/ fulfils."""

import dataclasses
from typing import Callable, Optional


@dataclasses.dataclass(frozen=True)
class Objective:
  """How to feed a model a batch and score it, as pure functions.

  `loss_fn(params, batch, rng, *, train)` returns metrics {name: (sum, count)};
  metrics['loss'] is what the step optimizes (gradient of its sum divided by its total count
  over micro-batches), so accumulation, packing and multi-host reduce exactly.
  """
  loss_fn: Callable   # (params, batch, rng, *, train: bool) -> {name: (sum, count)}
  init_fn: Callable   # rng -> logically boxed params for the model this objective feeds
  # (params, batch, rng) -> {name: (sum, count)} of greedy decoding against the targets;
  # encoder–decoder objectives only (train.eval_decode_batches).
  decode_fn: Optional[Callable] = None
