"""The input pipeline: config -> per-host shard -> examples -> packed rows -> global batches.

Each host reads ``records[process_index::process_count]``, shuffles it with the seed (a new
order every epoch), turns records into task examples, packs them and batches its share of the
global batch; ``jax.make_array_from_process_local_data`` assembles the global ``jax.Array``.
The state is grain's iterator state plus the packer's resume point and the running counters,
so a restored pipeline yields exactly the batch that followed the save.
"""

from __future__ import annotations

import copy
import functools
import gc
import json
import logging
from typing import Any

import grain
import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

from data import sources
from data import tokenizer as tokenizer_lib
from data import transforms

TASKS = ('lm', 'sft', 'mlm', 'span_corruption', 'preference')


def _str(v: Any) -> str:
  return v.decode('utf-8') if isinstance(v, bytes) else str(v)


def _has(record: dict, *keys: str) -> bool:
  return all(k in record for k in keys)


def record_text(record: dict, text_field: str = 'text') -> str:
  """The plain text of a record for LM-style tasks (pairs become prompt + newline + response)."""
  if text_field in record:
    return _str(record[text_field])
  if _has(record, 'question', 'answer'):
    return f"{_str(record['question'])}\n{_str(record['answer'])}"
  if _has(record, 'prompt', 'response') and _str(record['prompt']):
    return f"{_str(record['prompt'])}\n{_str(record['response'])}"
  if _str(record.get('messages', '')):
    return '\n'.join(m['content'] for m in json.loads(_str(record['messages'])))
  raise KeyError(f'record has no "{text_field}" field (set data.text_field), nor question/answer '
                 f'or prompt/response; its fields are {sorted(record)}')


def record_chat(tok: tokenizer_lib.Tokenizer, record: dict, chat_template: bool
                ) -> tuple[list[int], list[float]]:
  """Ids and response mask of an SFT record (a chat, prompt/response or question/answer)."""
  if _str(record.get('messages', '')):
    return tok.encode_chat(json.loads(_str(record['messages'])))
  for p, r in (('prompt', 'response'), ('question', 'answer')):
    if _has(record, p, r):
      return transforms.prompt_response_sequence(tok, _str(record[p]), _str(record[r]),
                                                 chat_template=chat_template)
  raise KeyError('data.task="sft" needs records with messages, prompt/response or '
                 f'question/answer; this record has {sorted(record)}')


def record_preference(record: dict) -> tuple[str, str, str]:
  """(prompt, chosen, rejected) of a preference record (or a problem with a wrong solution)."""
  if _has(record, 'prompt', 'chosen', 'rejected'):
    return _str(record['prompt']), _str(record['chosen']), _str(record['rejected'])
  if _has(record, 'question', 'answer', 'rejected_answer'):
    return _str(record['question']), _str(record['answer']), _str(record['rejected_answer'])
  raise KeyError('data.task="preference" needs records with prompt/chosen/rejected (or the '
                 f'synthetic source); this record has {sorted(record)}')


class TaskExamples:
  """Record (and rng) -> task examples; picklable so grain worker processes can run it."""

  def __init__(self, config, tok: tokenizer_lib.Tokenizer, raw_length: int = 0):
    d = config.data
    self.tok, self.task, self.seq_len, self.too_long = tok, d.task, d.seq_len, d.too_long
    self.text_field, self.chat_template = d.text_field, d.chat_template
    self.mlm = dict(rate=d.mlm_rate, mask_frac=d.mlm_mask_frac, random_frac=d.mlm_random_frac)
    self.noise_density, self.mean_span = d.noise_density, d.mean_noise_span_length
    self.raw_length = raw_length

  def __call__(self, record: dict, rng: np.random.Generator | None = None) -> list[dict]:
    tok = self.tok
    if self.task == 'lm':
      return transforms.lm_examples(tok.encode(record_text(record, self.text_field)),
                                    bos_id=tok.bos_id, eos_id=tok.eos_id,
                                    seq_len=self.seq_len, too_long=self.too_long)
    if self.task == 'sft':
      ids, mask = record_chat(tok, record, self.chat_template)
      return transforms.lm_examples_from_sequence(ids, mask, seq_len=self.seq_len,
                                                  too_long=self.too_long)
    if self.task == 'preference':
      prompt, chosen, rejected = record_preference(record)
      seqs = [transforms.prompt_response_sequence(tok, prompt, r,
                                                  chat_template=self.chat_template)
              for r in (chosen, rejected)]
      return [transforms.preference_example(*seqs, seq_len=self.seq_len,
                                            too_long=self.too_long)]
    ids = tok.encode(record_text(record, self.text_field))
    if self.task == 'mlm':
      lo, hi = tok.ordinary_range
      return transforms.mlm_examples(ids, rng, bos_id=tok.bos_id, eos_id=tok.eos_id,
                                     mask_id=tok.mask_id, vocab_low=lo, vocab_high=hi,
                                     special_ids=sorted(tok.special_id_set()),
                                     seq_len=self.seq_len, too_long=self.too_long, **self.mlm)
    return transforms.span_corruption_examples(
        ids, rng, raw_length=self.raw_length, noise_density=self.noise_density,
        mean_span_length=self.mean_span, sentinel_ids=tok.sentinel_ids, eos_id=tok.eos_id,
        decoder_start_id=tok.bos_id)


class PackedDataset(grain.IterDataset):
  """Packs a stream of per-record example lists into rows, resumable at any row boundary."""

  def __init__(self, parent: grain.IterDataset, packer: transforms.Packer, window: int,
               epoch_records: int):
    super().__init__(parent)
    self.packer, self.window, self.epoch_records = packer, window, epoch_records

  def __iter__(self) -> grain.DatasetIterator:
    return _PackedIterator(self._parent.__iter__(), self.packer, self.window,
                           self.epoch_records)


class _PackedIterator(grain.DatasetIterator):
  """Greedy rows stream; first-fit rows come from windows of ``window`` examples.

  The resume point is (parent state before a record, examples of it already consumed) plus,
  for first-fit, the rows of the current window already emitted: restoring re-reads from that
  point and repacks, which reproduces the same rows because packing is deterministic.
  """

  def __init__(self, parent: grain.DatasetIterator, packer: transforms.Packer, window: int,
               epoch_records: int):
    super().__init__(parent)
    self._packer, self._window, self._epoch_records = packer, window, epoch_records
    self._dropped_run = 0
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
    ex = self._record[self._taken - 1]
    if not transforms.is_dropped(ex):
      self._dropped_run = 0
    elif (run := self._dropped_run + 1) > self._epoch_records:
      raise ValueError(f'every one of the last {run} examples was dropped as too long (a whole '
                       'epoch): raise data.seq_len or set data.too_long to "truncate" or "split"')
    else:
      self._dropped_run = run
    return ex, pos

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
    """Reads up to ``window`` kept examples (dropped ones only add their counts) and packs them."""
    examples, dropped = [], np.zeros(len(transforms.STAT_NAMES), np.int64)
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


def padding_rows(spec: dict, count: int, pad_id: int) -> dict[str, np.ndarray]:
  """``count`` all-padding rows of every key (segment id 0, no loss, pad tokens)."""
  out = {}
  for k, (n, dt) in spec.items():
    fill = pad_id if k.endswith(('inputs', 'targets')) else 0
    out[k] = np.full((count, n), fill, dt)
  out[transforms.STATS] = np.zeros((count, len(transforms.STAT_NAMES)), np.int64)
  return out


def _stack_padded(rows: list[dict], *, local_batch: int, spec: dict, pad_id: int) -> dict:
  """Stacks rows; a short final batch is filled with all-padding rows."""
  out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  if len(rows) < local_batch:
    extra = padding_rows(spec, local_batch - len(rows), pad_id)
    out = {k: np.concatenate([v, extra[k]]) for k, v in out.items()}
  return out


def batch_spec(config) -> dict[str, tuple[int, np.dtype]]:
  """Every batch key of ``config.data.task`` with its row length and dtype."""
  d = config.data
  lm = ('inputs', 'targets', 'loss_mask', 'segment_ids', 'positions')
  if d.task == 'span_corruption':
    streams = {'encoder_': (d.seq_len, ('inputs', 'segment_ids', 'positions')),
               'decoder_': (target_length(config), lm)}
  elif d.task == 'preference':
    streams = {'chosen_': (d.seq_len, lm), 'rejected_': (d.seq_len, lm)}
  else:
    streams = {'': (d.seq_len, lm)}
  return {p + k: (n, np.dtype(np.float32 if k == 'loss_mask' else np.int32))
          for p, (n, keys) in streams.items() for k in keys}


def target_length(config) -> int:
  """Decoder length of span corruption: ``data.target_len``, or the computed need if 0."""
  d = config.data
  _, need = transforms.span_corruption_lengths(d.seq_len, d.noise_density,
                                               d.mean_noise_span_length)
  if d.target_len and d.target_len < need:
    raise ValueError(f'data.target_len={d.target_len} is shorter than the {need} decoder tokens '
                     f'a full chunk needs at seq_len={d.seq_len}; set it to 0 (computed) or '
                     f'at least {need}')
  return d.target_len or need


class Pipeline:
  """Iterator of global batches (``dict[str, jax.Array]``) with checkpointable state.

  With several processes and a finite number of epochs, hosts agree on the end: a host whose
  shard is exhausted feeds all-padding rows until every host is, then all stop together.
  """

  def __init__(self, dataset: grain.IterDataset, tokenizer: tokenizer_lib.Tokenizer,
               batch_sharding: jax.sharding.Sharding, spec: dict, local_batch: int,
               info: dict, sync_end: bool):
    self.tokenizer = tokenizer
    self._sharding = batch_sharding
    self._spec, self._local_batch = spec, local_batch
    self._info = info
    self._sync_end = sync_end
    self._iterator = iter(dataset)
    self._exhausted = False
    self._counts = dict.fromkeys(transforms.STAT_NAMES, 0)
    self._tokens = 0
    self._slots = 0
    self._batches = 0

  def __iter__(self) -> Pipeline:
    return self

  def _next_local(self) -> dict[str, np.ndarray] | None:
    if not self._exhausted:
      try:
        return dict(next(self._iterator))
      except StopIteration:
        self._exhausted = True
    return None

  def __next__(self) -> dict[str, jax.Array]:
    local = self._next_local()
    if self._sync_end:
      done = multihost_utils.process_allgather(np.array(local is None))
      if np.all(done):
        raise StopIteration
      if local is None:
        local = padding_rows(self._spec, self._local_batch, self.tokenizer.pad_id)
    elif local is None:
      raise StopIteration
    counts = local.pop(transforms.STATS).sum(axis=0)
    for name, c in zip(transforms.STAT_NAMES, counts):
      if c and not self._counts[name] and name != 'examples':
        logging.warning('data: examples longer than a row are being %s (data.too_long=%r); '
                        'stats() counts them', name, self._info['too_long'])
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
    state = {'iterator': self._iterator.get_state(), 'exhausted': self._exhausted,
             'counts': dict(self._counts), 'tokens': self._tokens, 'slots': self._slots,
             'batches': self._batches}
    return json.loads(json.dumps(state))

  def set_state(self, state: dict) -> None:
    """Restores a state from ``get_state`` (of a pipeline built from the same config)."""
    self._iterator.set_state(copy.deepcopy(state['iterator']))
    self._exhausted = state['exhausted']
    self._counts = dict(state['counts'])
    self._tokens, self._slots = state['tokens'], state['slots']
    self._batches = state['batches']

  def close(self) -> None:
    """Stops grain's threads and worker processes; the pipeline cannot be used afterwards."""
    if self._iterator is not None:
      self._iterator.close()
      # Drop the iterators now: grain's __del__ fails if it first runs at interpreter exit.
      self._iterator = None
      gc.collect()

  def stats(self) -> dict:
    """This host's counters: batches, tokens, packing efficiency, examples, truncated, dropped,
    and the bad source records skipped while preparing the source."""
    out = dict(self._info)
    out.update(self._counts)
    out['batches'] = self._batches
    out['tokens'] = self._tokens
    out['packing_efficiency'] = self._tokens / self._slots if self._slots else 0.0
    return out


def build_pipeline(config, batch_sharding: jax.sharding.Sharding, *, split: str = 'train',
                   model_vocab_size: int | None = None) -> Pipeline:
  """Builds this host's pipeline for ``split`` from ``config.data``, ``config.seed`` and
  ``config.train.batch_size`` (the global batch in rows).

  ``split='train'`` shuffles (``data.shuffle``) and runs ``data.num_epochs``; a held-out split
  (``'test'``, ``'eval'``, ``'validation'``; see ``sources.open_source``) or any other TFDS
  split string is read in order and repeats forever, so an evaluation that rebuilds it sees the
  same batches.
  """
  d = config.data
  if d.task not in TASKS:
    raise ValueError(f'data.task={d.task!r}; use one of {TASKS}')
  if d.too_long not in transforms.TOO_LONG_POLICIES:
    raise ValueError(f'data.too_long={d.too_long!r}; use one of {transforms.TOO_LONG_POLICIES}')
  if d.task == 'preference' and d.too_long == 'split':
    raise ValueError('data.too_long="split" cannot split a preference pair; use "truncate" or '
                     '"drop"')
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
  source = sources.open_source(
      d.source, split, data_dir=d.data_dir, bad_lines=d.bad_lines, text_unit=d.text_unit,
      text_field=d.text_field, eval_fraction=d.eval_fraction, eval_split=d.eval_split,
      synthetic_options=dict(seed=d.synthetic_seed, num_examples=(
          d.synthetic_test_size if split in sources.HELD_OUT else d.synthetic_train_size),
          families=tuple(d.synthetic_families), levels=tuple(d.synthetic_levels),
          languages=tuple(d.synthetic_languages), test_fraction=d.synthetic_test_fraction))
  n = len(source.records)
  if n < count:
    raise ValueError(f'data.source={d.source!r} split {split!r} has {n} records, fewer than the '
                     f'{count} processes reading it' + (' (the source is empty)' if not n else ''))
  if source.skipped:
    logging.warning('data.source=%s: %d bad records were skipped while preparing it, e.g. %s',
                    d.source, source.skipped, '; '.join(source.skip_reasons[:3]))

  ds = grain.MapDataset.source(source.records)[index::count]
  train = split == 'train'
  if train and d.shuffle:
    ds = ds.shuffle(seed=config.seed)
  finite = train and d.num_epochs > 0
  ds = ds.repeat(d.num_epochs if finite else None)
  spec = batch_spec(config)
  raw_length = 0
  if d.task == 'span_corruption':
    raw_length, _ = transforms.span_corruption_lengths(d.seq_len, d.noise_density,
                                                       d.mean_noise_span_length)
  examples = TaskExamples(config, tok, raw_length)
  if d.task in ('mlm', 'span_corruption'):
    ds = ds.random_map(examples, seed=config.seed)
  else:
    ds = ds.map(examples)
  lengths = {k[:-len('segment_ids')]: n for k, (n, _) in spec.items()
             if k.endswith('segment_ids')}
  pad = {'inputs': tok.pad_id, 'targets': tok.pad_id}
  packer = transforms.Packer(lengths, pad_values=pad, method=d.packing,
                             max_segments=1 if d.task == 'preference' else None)
  rows = PackedDataset(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)), packer,
                       d.pack_window, epoch_records=len(range(index, n, count)))
  batches = rows.batch(local_batch, drop_remainder=False, batch_fn=functools.partial(
      _stack_padded, local_batch=local_batch, spec=spec, pad_id=tok.pad_id))
  if d.worker_count > 0:
    if not flags.FLAGS.is_parsed():
      # grain's workers read absl flags; outside an absl app (scripts, tests) use the defaults.
      flags.FLAGS.mark_as_parsed()
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.worker_count))
  else:
    # One background thread builds the next batches while the train step runs (XLA releases
    # the GIL); more reader threads only contend for the GIL.
    batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=4)
  info = {'task': d.task, 'source': d.source, 'split': split, 'too_long': d.too_long,
          'records': n,
          'host_records': len(range(index, n, count)), 'source_skipped': source.skipped,
          'process_index': index, 'process_count': count, 'vocab_size': tok.vocab_size}
  logging.info('data pipeline: %s', info)
  return Pipeline(batches, tok, batch_sharding, spec, local_batch, info,
                  sync_end=finite and count > 1)
