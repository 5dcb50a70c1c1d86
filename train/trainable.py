"""Which parameters the optimizer trains; the others ride in the train state frozen.

One rule decides, by parameter path: with model.lora_rank > 0 only the LoRA adapters train
(their base weights are frozen); otherwise every parameter trains. The step differentiates the
trained parameters only and the optimizer state covers only them, so a new selection (a
pattern of trainable names, a DPO reference model) changes this rule, not the step.
"""

from typing import Callable

from model.lora import is_adapter


def trainable(config) -> Callable[[tuple], bool]:
  """Predicate on a parameter's path (tuple of keys): True where the optimizer trains it."""
  model = config.model
  if not model.lora_rank:
    if model.lora_quant:
      raise ValueError(f'model.lora_quant={model.lora_quant!r} stores the kernels frozen in 4 '
                       'bits, so only LoRA adapters can train: set model.lora_rank and '
                       'model.lora_targets.')
    return lambda path: True
  if model.router_bias_update_rate:
    raise ValueError(f'model.router_bias_update_rate={model.router_bias_update_rate} moves the '
                     'router bias, which LoRA (model.lora_rank > 0) freezes with the other base '
                     'weights; set it to 0 for LoRA fine-tuning.')
  return is_adapter
