"""Pure transforms: tokenize, build per-task examples, pack them into fixed-length rows.

An *example* is a dict ``{stream_prefix: {key: 1-D array}}``; all arrays of one stream share a
length. The LM uses one stream (prefix ``''``); span corruption two (``'encoder_'``,
``'decoder_'``); preference two (``'chosen_'``, ``'rejected_'``) that must stay in the same row.
A *row* is a flat dict ``{prefix + key: [length] array}`` plus ``prefix + 'segment_ids'``
(0 = padding, 1.. per example) and ``prefix + 'positions'`` (restarting at 0 per segment).

Examples also carry ``STATS`` (an int64 vector) so counts made in worker processes reach the
main process inside the rows: ``[examples, truncated, dropped]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

STATS = '_stats'
STAT_NAMES = ('examples', 'truncated', 'dropped')
TOO_LONG_POLICIES = ('truncate', 'drop', 'split')


def example_stats(truncated: int = 0, dropped: int = 0, examples: int = 1) -> np.ndarray:
  """The per-example counter vector carried to the rows."""
  return np.array([examples, truncated, dropped], np.int64)


def dropped_example() -> dict:
  """Marker for an example removed by the too-long policy; the packer counts and skips it."""
  return {STATS: example_stats(dropped=1, examples=0)}


def lm_examples(ids: Sequence[int], *, bos_id: int, eos_id: int, seq_len: int,
                too_long: str, loss_mask: Sequence[float] | None = None) -> list[dict]:
  """Causal-LM examples from one document: ``[bos] ids [eos]`` shifted into inputs/targets.

  ``loss_mask`` (aligned with ``ids``, e.g. 1 on response tokens) marks which *targets* are
  trained; the eos target inherits the mask of the last token. Without it every target is
  trained. A document longer than ``seq_len`` targets follows ``too_long``.
  """
  doc = np.asarray([bos_id, *ids, eos_id], np.int32)
  if loss_mask is None:
    weights = np.ones(len(doc) - 1, np.float32)
  else:
    m = np.asarray(loss_mask, np.float32)
    if len(m) != len(ids):
      raise ValueError(f'loss mask has {len(m)} entries for {len(ids)} tokens')
    weights = np.concatenate([m, m[-1:] if len(m) else np.ones(1, np.float32)])
  return _shifted(doc, weights, seq_len, too_long)


def lm_examples_from_sequence(ids: Sequence[int], mask: Sequence[float], *, seq_len: int,
                              too_long: str) -> list[dict]:
  """Causal-LM examples from an already delimited sequence (e.g. a chat-template output).

  ``mask[t]`` says whether token ``t`` is trained as a *target*.
  """
  doc = np.asarray(ids, np.int32)
  return _shifted(doc, np.asarray(mask, np.float32)[1:], seq_len, too_long)


def _shifted(doc: np.ndarray, weights: np.ndarray, seq_len: int, too_long: str) -> list[dict]:
  n = len(doc) - 1
  if n <= 0:
    return [dropped_example()]
  starts, truncated, dropped = cut_points(n, seq_len, too_long)
  if dropped:
    return [dropped_example()]
  out = []
  for k, s in enumerate(starts):
    e = min(s + seq_len, n)
    out.append({'': {'inputs': doc[s:e], 'targets': doc[s + 1:e + 1],
                     'loss_mask': weights[s:e]},
                STATS: example_stats(truncated=truncated, examples=int(k == 0))})
  return out


def cut_points(n: int, max_len: int, policy: str) -> tuple[list[int], int, int]:
  """Applies the too-long policy to a sequence of ``n`` tokens that must fit ``max_len``.

  Returns ``(starts, truncated, dropped)``: chunk start offsets (each chunk at most
  ``max_len``); ``'truncate'`` keeps the head, ``'drop'`` keeps nothing, ``'split'`` keeps all.
  """
  if n <= max_len:
    return [0], 0, 0
  if policy == 'truncate':
    return [0], 1, 0
  if policy == 'drop':
    return [], 0, 1
  if policy == 'split':
    return list(range(0, n, max_len)), 0, 0
  raise ValueError(f'data.too_long={policy!r}; use one of {TOO_LONG_POLICIES}')


def _length(example: dict, prefix: str) -> int:
  return len(next(iter(example[prefix].values())))


def is_dropped(example: dict) -> bool:
  """True for the marker left by an example the too-long policy dropped."""
  return len(example) == 1


class Row:
  """One row being filled: per stream, the examples placed so far and their summed stats."""

  def __init__(self, lengths: dict[str, int], max_segments: int | None):
    self.lengths = lengths
    self.max_segments = max_segments
    self.used = dict.fromkeys(lengths, 0)
    self.parts: list[dict] = []
    self.stats = np.zeros(len(STAT_NAMES), np.int64)

  def fits(self, example: dict) -> bool:
    if self.max_segments is not None and len(self.parts) >= self.max_segments:
      return False
    return all(self.used[p] + _length(example, p) <= n for p, n in self.lengths.items())

  def add(self, example: dict) -> None:
    for p in self.used:
      self.used[p] += _length(example, p)
    self.parts.append(example)
    self.stats += example[STATS]


class Packer:
  """Packs examples into rows of fixed per-stream lengths.

  Args:
    lengths: ``{stream_prefix: row length}``.
    pad_values: ``{key: value}`` used for padding (default 0); segment ids pad with 0.
    method: ``'greedy'`` fills one row at a time and closes it when the next example does not
      fit (order preserving, streams); ``'first_fit'`` packs a window of examples, longest
      first, each into the first row with room (tighter rows; order within a window changes).
    max_segments: at most this many examples per row (``1`` disables packing).
  """

  def __init__(self, lengths: dict[str, int], *, pad_values: dict[str, float] | None = None,
               method: str = 'greedy', max_segments: int | None = None):
    if method not in ('greedy', 'first_fit'):
      raise ValueError(f'data.packing={method!r}; use "greedy" or "first_fit"')
    self.lengths = dict(lengths)
    self.pad_values = dict(pad_values or {})
    self.method = method
    self.max_segments = max_segments

  def new_row(self) -> Row:
    return Row(self.lengths, self.max_segments)

  def check(self, example: dict) -> None:
    """Raises if an example cannot fit an empty row (the too-long policy was not applied)."""
    for p, n in self.lengths.items():
      if _length(example, p) > n:
        raise ValueError(f'an example of length {_length(example, p)} does not fit stream '
                         f'{p or "lm"!r} of length {n}; apply the too-long policy first')

  def pack(self, examples: Sequence[dict]) -> list[dict]:
    """Packs a finite list of (non-dropped) examples; every row is returned, the last partial."""
    rows: list[Row] = []
    items = list(examples)
    for ex in items:
      self.check(ex)
    if self.method == 'first_fit':
      items.sort(key=lambda ex: -max(_length(ex, p) for p in self.lengths))
      for ex in items:
        row = next((r for r in rows if r.fits(ex)), None)
        if row is None:
          row = self.new_row()
          rows.append(row)
        row.add(ex)
    else:
      for ex in items:
        if not rows or not rows[-1].fits(ex):
          rows.append(self.new_row())
        rows[-1].add(ex)
    return [self.materialize(r) for r in rows]

  def materialize(self, row: Row) -> dict:
    """Concatenates a row's examples, pads them and adds segment ids and positions."""
    out: dict[str, np.ndarray] = {}
    for p, n in self.lengths.items():
      seg = np.zeros(n, np.int32)
      pos = np.zeros(n, np.int32)
      keys = row.parts[0][p].keys()
      at = 0
      for i, ex in enumerate(row.parts):
        m = _length(ex, p)
        seg[at:at + m] = i + 1
        pos[at:at + m] = np.arange(m, dtype=np.int32)
        at += m
      for k in keys:
        cat = np.concatenate([ex[p][k] for ex in row.parts])
        buf = np.full(n, self.pad_values.get(k, 0), cat.dtype)
        buf[:len(cat)] = cat
        out[p + k] = buf
      out[p + 'segment_ids'] = seg
      out[p + 'positions'] = pos
    out[STATS] = row.stats.copy()
    return out


def attention_mask(segment_ids: np.ndarray, *, causal: bool = True) -> np.ndarray:
  """``[..., L, L]`` mask the models build from packed rows: same non-zero segment (and causal)."""
  seg = np.asarray(segment_ids)
  mask = (seg[..., :, None] == seg[..., None, :]) & (seg[..., :, None] > 0)
  if causal:
    n = seg.shape[-1]
    mask &= np.tril(np.ones((n, n), bool))
  return mask
