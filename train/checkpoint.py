"""Orbax checkpoints of the train state together with the data pipeline's position."""

import dataclasses
import json
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath


class PerProcessJsonHandler(ocp.CheckpointHandler):
  """One JSON file per process (process_I-of-N.json), as grain checkpoints its iterators: every
  host reads its own share of the data, so each host's pipeline position is its own."""

  @staticmethod
  def _path(directory: epath.Path) -> epath.Path:
    return directory / f'process_{jax.process_index()}-of-{jax.process_count()}.json'

  def save(self, directory: epath.Path, args: 'PerProcessJsonSave') -> None:
    self._path(directory).write_text(json.dumps(args.item))

  def restore(self, directory: epath.Path, args: Optional['PerProcessJsonRestore'] = None):
    path = self._path(directory)
    if not path.exists():
      saved = sorted(p.name for p in directory.glob('process_*.json'))
      raise ValueError(f'{path} is missing (saved: {saved}): a job resumes its data pipeline '
                       'only with the number of processes that saved it.')
    return json.loads(path.read_text())


@ocp.args.register_with_handler(PerProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class PerProcessJsonSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(PerProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class PerProcessJsonRestore(ocp.args.CheckpointArgs):
  pass


class Checkpointer:
  """Saves every `every_steps` (async), keeps the newest `keep`, restores onto any mesh."""

  def __init__(self, directory: str, every_steps: int, keep: int, async_save: bool = True):
    if every_steps < 1 or keep < 1:
      raise ValueError(f'checkpoint.every_steps={every_steps} and checkpoint.keep={keep} must '
                       'both be >= 1.')
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every_steps,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Whether `step` is on the save cadence (ask before gathering the data state)."""
    return self._manager.should_save(step)

  def save(self, step: int, state: Any, data_state: dict, force: bool = False) -> bool:
    """Saves if `step` is on the cadence (or `force`); returns whether a save started."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=PerProcessJsonSave(data_state))
    return self._manager.save(step, args=args, force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """(state, data_state) at `step`; `abstract_state` holds ShapeDtypeStructs with the target
    shardings, so a checkpoint written on one mesh restores onto another."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=PerProcessJsonRestore())
    restored = self._manager.restore(step, args=args)
    return restored['state'], restored['data']

  def close(self) -> None:
    """Waits for pending async saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()
