"""Objectives by name; each is a pure loss function over a batch format of the data layer."""

from train.objectives import lm, mlm, span
from train.objectives.base import Objective

OBJECTIVES = {'causal_lm': lm.causal_lm, 'mlm': mlm.masked_lm,
              'span_corruption': span.span_corruption, 'prefix_lm': span.prefix_lm}


def build_objective(name: str, model, config) -> Objective:
  """The objective `config.objective.name` for `model`."""
  if name not in OBJECTIVES:
    raise ValueError(f'objective.name={name!r}; choose one of {sorted(OBJECTIVES)}.')
  return OBJECTIVES[name](model, config)
