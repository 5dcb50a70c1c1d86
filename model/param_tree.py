"""Nested parameter dicts split by a rule on each leaf's path, and joined back.

A path is the tuple of dict keys down to a leaf, e.g. ('layers', 'attn', 'query', 'lora_a');
leaves may be arrays, logically boxed arrays, ShapeDtypeStructs or shardings.
"""

from typing import Callable

from flax import traverse_util


def partition(tree: dict, predicate: Callable[[tuple], bool]) -> tuple[dict, dict]:
  """(the leaves whose path satisfies `predicate`, the others), each nested as in `tree`;
  subtrees left without leaves are dropped."""
  flat = traverse_util.flatten_dict(tree)
  chosen = {path: leaf for path, leaf in flat.items() if predicate(path)}
  rest = {path: leaf for path, leaf in flat.items() if path not in chosen}
  return traverse_util.unflatten_dict(chosen), traverse_util.unflatten_dict(rest)


def combine(*trees: dict) -> dict:
  """One nested dict holding the leaves of `trees`, whose paths must not overlap."""
  flat = [traverse_util.flatten_dict(t) for t in trees]
  merged = {path: leaf for part in flat for path, leaf in part.items()}
  if len(merged) != sum(map(len, flat)):
    raise ValueError('combine: the parameter trees share paths; each leaf must come from one.')
  return traverse_util.unflatten_dict(merged)
