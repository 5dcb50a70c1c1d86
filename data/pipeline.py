"""The input pipeline: config -> per-host shard -> examples -> packed rows -> global batches.

Each host reads ``records[process_index::process_count]``, shuffles it with the seed (a new
order every epoch), turns records into task examples, packs them and batches its share of the
global batch; ``jax.make_array_from_process_local_data`` assembles the global ``jax.Array``.
The state is grain's iterator state plus the packer's resume point and the running counters,
so a restored pipeline yields exactly the batch that followed the save.
"""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

import grain
import jax
import numpy as np

from data import synthetic
from data import tokenizer as tokenizer_lib
from data import transforms

TASKS = ('lm',)


class LMExamples:
  """Record -> causal-LM examples (picklable, so worker processes can run it)."""

  def __init__(self, tokenizer: tokenizer_lib.Tokenizer, seq_len: int, too_long: str):
    self.tokenizer, self.seq_len, self.too_long = tokenizer, seq_len, too_long

  def __call__(self, record: dict) -> list[dict]:
    text = record_text(record)
    return transforms.lm_examples(self.tokenizer.encode(text), bos_id=self.tokenizer.bos_id,
                                  eos_id=self.tokenizer.eos_id, seq_len=self.seq_len,
                                  too_long=self.too_long)


def record_text(record: dict) -> str:
  """The plain text of a record for LM-style tasks (problems become question + solution)."""
  if 'text' in record:
    return _str(record['text'])
  if 'question' in record and 'answer' in record:
    return f"{_str(record['question'])}\n{_str(record['answer'])}"
  raise KeyError(f'record has no "text" (or "question"/"answer") field; fields: {sorted(record)}')


def _str(v: Any) -> str:
  return v.decode('utf-8') if isinstance(v, bytes) else str(v)


class PackedDataset(grain.IterDataset):
  """Packs a stream of per-record example lists into rows, resumable at any row boundary."""

  def __init__(self, parent: grain.IterDataset, packer: transforms.Packer, window: int):
    super().__init__(parent)
    self.packer, self.window = packer, window

  def __iter__(self) -> grain.DatasetIterator:
    return _PackedIterator(self._parent.__iter__(), self.packer, self.window)


class _PackedIterator(grain.DatasetIterator):
  """Greedy rows stream; first-fit rows come from windows of ``window`` examples.

  The resume point is (parent state before a record, examples of it already consumed) plus,
  for first-fit, the rows of the current window already emitted: restoring re-reads from that
  point and repacks, which reproduces the same rows because packing is deterministic.
  """

  def __init__(self, parent: grain.DatasetIterator, packer: transforms.Packer, window: int):
    super().__init__(parent)
    self._packer, self._window = packer, window
    self._reset(parent.get_state(), 0, 0)

  def _reset(self, parent_state: dict, offset: int, skip_rows: int) -> None:
    """Positions the iterator at a resume point (the parent is already at ``parent_state``)."""
    self._record: list[dict] = []
    self._record_state = copy.deepcopy(parent_state)
    self._taken = 0
    self._carry = None          # greedy: read example that starts the next row
    self._rows: list[dict] = []
    self._window_start = (copy.deepcopy(parent_state), offset)
    self._emitted = 0
    if offset:
      self._record_state = copy.deepcopy(parent_state)
      self._record = list(next(self._parent))
      self._taken = offset
    if skip_rows:
      self._fill_window()
      del self._rows[:skip_rows]
      self._emitted = skip_rows

  def _position(self) -> tuple[dict, int]:
    """Where the next unread example is: (parent state before its record, index in it)."""
    if self._taken < len(self._record):
      return copy.deepcopy(self._record_state), self._taken
    return self._parent.get_state(), 0

  def _read(self) -> tuple[dict, tuple[dict, int]]:
    while self._taken >= len(self._record):
      self._record_state = self._parent.get_state()
      self._record = list(next(self._parent))
      self._taken = 0
    pos = (copy.deepcopy(self._record_state), self._taken)
    self._taken += 1
    return self._record[self._taken - 1], pos

  def __next__(self) -> dict:
    if self._packer.method == 'first_fit':
      return self._next_first_fit()
    row = self._packer.new_row()
    if self._carry is not None:
      row.add(self._carry[0])
      self._carry = None
    while True:
      try:
        ex, pos = self._read()
      except StopIteration:
        if row.parts:
          return self._packer.materialize(row)
        raise
      if transforms.is_dropped(ex):
        row.stats += ex[transforms.STATS]
        continue
      self._packer.check(ex)
      if row.parts and not row.fits(ex):
        self._carry = (ex, pos)
        return self._packer.materialize(row)
      row.add(ex)

  def _fill_window(self) -> None:
    examples, dropped = [], np.zeros(len(transforms.STAT_NAMES), np.int64)
    while not self._rows:
      while len(examples) < self._window:
        try:
          ex, _ = self._read()
        except StopIteration:
          break
        if transforms.is_dropped(ex):
          dropped += ex[transforms.STATS]
        else:
          examples.append(ex)
      if not examples:
        raise StopIteration
      self._rows = self._packer.pack(examples)
    self._rows[0][transforms.STATS] += dropped

  def _next_first_fit(self) -> dict:
    if not self._rows:
      self._window_start = self._position()
      self._emitted = 0
      self._fill_window()
    self._emitted += 1
    return self._rows.pop(0)

  def get_state(self) -> dict:
    if self._packer.method == 'first_fit':
      if not self._rows:
        state, offset = self._position()
        return {'parent': state, 'offset': offset, 'skip_rows': 0}
      state, offset = self._window_start
      return {'parent': copy.deepcopy(state), 'offset': offset, 'skip_rows': self._emitted}
    state, offset = self._carry[1] if self._carry is not None else self._position()
    return {'parent': copy.deepcopy(state), 'offset': offset, 'skip_rows': 0}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(copy.deepcopy(state['parent']))
    self._reset(state['parent'], state['offset'], state['skip_rows'])


def _stack(rows: list[dict]) -> dict:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class Pipeline:
  """Iterator of global batches (``dict[str, jax.Array]``) with checkpointable state."""

  def __init__(self, dataset: grain.IterDataset, tokenizer: tokenizer_lib.Tokenizer,
               batch_sharding: jax.sharding.Sharding, info: dict):
    self.tokenizer = tokenizer
    self._dataset = dataset
    self._sharding = batch_sharding
    self._info = info
    self._iterator = iter(dataset)
    self._counts = dict.fromkeys(transforms.STAT_NAMES, 0)
    self._tokens = 0
    self._slots = 0
    self._batches = 0

  def __iter__(self) -> Pipeline:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    local = dict(next(self._iterator))
    counts = local.pop(transforms.STATS).sum(axis=0)
    for name, c in zip(transforms.STAT_NAMES, counts):
      self._counts[name] += int(c)
    for k, v in local.items():
      if k.endswith('segment_ids'):
        self._tokens += int((v > 0).sum())
        self._slots += v.size
    self._batches += 1
    return {k: jax.make_array_from_process_local_data(self._sharding, v)
            for k, v in local.items()}

  def get_state(self) -> dict:
    """JSON-serialisable state; ``set_state`` of it makes the next batch the one after the save."""
    state = {'iterator': self._iterator.get_state(), 'counts': dict(self._counts),
             'tokens': self._tokens, 'slots': self._slots, 'batches': self._batches}
    return json.loads(json.dumps(state))

  def set_state(self, state: dict) -> None:
    """Restores a state from ``get_state`` (of a pipeline built from the same config)."""
    self._iterator.set_state(copy.deepcopy(state['iterator']))
    self._counts = dict(state['counts'])
    self._tokens, self._slots = state['tokens'], state['slots']
    self._batches = state['batches']

  def stats(self) -> dict:
    """Counters of this host: batches, packing efficiency, examples, truncated, dropped, ..."""
    out = dict(self._info)
    out.update(self._counts)
    out['batches'] = self._batches
    out['tokens'] = self._tokens
    out['packing_efficiency'] = self._tokens / self._slots if self._slots else 0.0
    return out


def _source(config, split: str):
  """Random-access records for ``config.data.source`` and ``split``."""
  d = config.data
  kind, _, _ = d.source.partition(':')
  if kind == 'synthetic':
    name = 'test' if split in ('eval', 'test') else split
    size = d.synthetic_test_size if name == 'test' else d.synthetic_train_size
    return synthetic.SyntheticProblems(
        name, seed=d.synthetic_seed, num_examples=size, families=tuple(d.synthetic_families),
        levels=tuple(d.synthetic_levels), languages=tuple(d.synthetic_languages),
        test_fraction=d.synthetic_test_fraction)
  raise ValueError(f'data.source={d.source!r} is not understood; use "synthetic"')


def build_pipeline(config, batch_sharding: jax.sharding.Sharding, *, split: str = 'train',
                   model_vocab_size: int | None = None) -> Pipeline:
  """Builds this host's pipeline for ``split`` from ``config.data``, ``config.seed`` and
  ``config.train.batch_size`` (the global batch in rows).

  ``split='train'`` shuffles and repeats for ``data.num_epochs``; any other split (``'eval'``
  maps to the source's held-out split) is read in order and repeats forever, so an evaluation
  that rebuilds it sees the same batches every time.
  """
  d = config.data
  if d.task not in TASKS:
    raise ValueError(f'data.task={d.task!r}; use one of {TASKS}')
  tok = tokenizer_lib.build_tokenizer(d.tokenizer, pad_id=d.pad_id, num_sentinels=d.num_sentinels)
  if model_vocab_size is not None and tok.vocab_size > model_vocab_size:
    raise ValueError(f'tokenizer {d.tokenizer!r} has {tok.vocab_size} ids but the model embeds '
                     f'only {model_vocab_size}; raise the model vocab_size to at least '
                     f'{tok.vocab_size} or choose a smaller tokenizer')
  count, index = jax.process_count(), jax.process_index()
  if config.train.batch_size % count:
    raise ValueError(f'train.batch_size={config.train.batch_size} must divide evenly over '
                     f'{count} processes')
  local_batch = config.train.batch_size // count
  records = _source(config, split)
  if len(records) == 0:
    raise ValueError(f'data.source={d.source!r} split {split!r} has no records')
  if len(records) < count:
    raise ValueError(f'data.source={d.source!r} split {split!r} has {len(records)} records, '
                     f'fewer than the {count} processes reading it')
  ds = grain.MapDataset.source(records)[index::count]
  train = split == 'train'
  if train and d.shuffle:
    ds = ds.shuffle(seed=config.seed)
  ds = ds.repeat(None if not train or d.num_epochs <= 0 else d.num_epochs)
  ds = ds.map(LMExamples(tok, d.seq_len, d.too_long))
  packer = transforms.Packer({'': d.seq_len}, pad_values={'inputs': tok.pad_id,
                                                          'targets': tok.pad_id},
                             method=d.packing)
  rows = PackedDataset(ds.to_iter_dataset(), packer, d.pack_window)
  batches = rows.batch(local_batch, drop_remainder=True, batch_fn=_stack)
  if d.worker_count > 0:
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.worker_count))
  info = {'task': d.task, 'source': d.source, 'split': split, 'records': len(records),
          'host_records': len(range(index, len(records), count)),
          'process_index': index, 'process_count': count}
  logging.info('data pipeline: %s', info)
  return Pipeline(batches, tok, batch_sharding, info)
