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
      # Longest first; each goes to the first row whose free space (per stream) holds it.
      cap = np.array(list(self.lengths.values()), np.int64)
      need = np.array([[_length(ex, p) for p in self.lengths] for ex in items], np.int64)
      free = np.zeros((len(items), len(cap)), np.int64)
      segments = np.zeros(len(items), np.int64)
      limit = self.max_segments or len(items) + 1
      for i in np.argsort(-need.max(axis=1), kind='stable'):
        ok = (free[:len(rows)] >= need[i]).all(axis=1) & (segments[:len(rows)] < limit)
        j = int(np.argmax(ok)) if ok.any() else len(rows)
        if j == len(rows):
          rows.append(self.new_row())
          free[j] = cap
        rows[j].add(items[i])
        free[j] -= need[i]
        segments[j] += 1
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


def mlm_examples(ids: Sequence[int], rng: np.random.Generator, *, bos_id: int, eos_id: int,
                 mask_id: int, vocab_low: int, vocab_high: int, special_ids: Sequence[int],
                 seq_len: int, too_long: str, rate: float = 0.15, mask_frac: float = 0.8,
                 random_frac: float = 0.1) -> list[dict]:
  """BERT masking of one document, cut into ``[bos] chunk [eos]`` pieces of at most seq_len.

  ``round(rate * n)`` of each piece's ``n`` text tokens are selected (at least one); of those,
  ``mask_frac`` become ``mask_id``, ``random_frac`` a random ordinary token drawn from
  ``[vocab_low, vocab_high)`` minus ``special_ids``, and the rest stay unchanged. Targets are
  the original ids; the loss mask marks the selected positions.
  """
  ids = np.asarray(ids, np.int32)
  starts, truncated, dropped = cut_points(len(ids), seq_len - 2, too_long)
  if dropped or not len(ids):
    return [dropped_example()]
  specials = np.asarray(sorted(special_ids), np.int64)
  out = []
  for k, s in enumerate(starts):
    chunk = ids[s:s + seq_len - 2]
    n = len(chunk)
    targets = np.concatenate([[bos_id], chunk, [eos_id]]).astype(np.int32)
    inputs = targets.copy()
    loss = np.zeros(n + 2, np.float32)
    chosen = 1 + rng.choice(n, size=max(1, int(round(rate * n))), replace=False)
    action = rng.random(len(chosen))
    to_mask = chosen[action < mask_frac]
    to_random = chosen[(action >= mask_frac) & (action < mask_frac + random_frac)]
    inputs[to_mask] = mask_id
    inputs[to_random] = _ordinary_tokens(rng, len(to_random), vocab_low, vocab_high, specials)
    loss[chosen] = 1.0
    out.append({'': {'inputs': inputs, 'targets': targets, 'loss_mask': loss},
                STATS: example_stats(truncated=truncated, examples=int(k == 0))})
  return out


def _ordinary_tokens(rng: np.random.Generator, n: int, low: int, high: int,
                     specials: np.ndarray) -> np.ndarray:
  out = rng.integers(low, high, size=n)
  bad = np.isin(out, specials)
  while bad.any():
    out[bad] = rng.integers(low, high, size=int(bad.sum()))
    bad = np.isin(out, specials)
  return out.astype(np.int32)


def span_corruption_lengths(inputs_length: int, noise_density: float,
                            mean_span_length: float) -> tuple[int, int]:
  """(raw tokens per chunk, targets length) so a corrupted chunk fills ``inputs_length``.

  A chunk of ``t`` tokens with ``s`` noise spans becomes ``t - noise + s + 1`` inputs
  (sentinels and eos) and ``noise + s + 1`` targets; the largest ``t`` that fits is chosen, so
  nothing is ever cut.
  """
  if not 0.0 < noise_density < 1.0 or mean_span_length < 1.0:
    raise ValueError(f'span corruption needs 0 < noise_density < 1 and mean_span_length >= 1; '
                     f'got {noise_density} and {mean_span_length}')

  def lengths(t: int) -> tuple[int, int]:
    noise, spans = _noise_counts(t, noise_density, mean_span_length)
    return t - noise + spans + 1, noise + spans + 1

  t = 2
  while lengths(t + 1)[0] <= inputs_length:
    t += 1
  if lengths(t)[0] > inputs_length:
    raise ValueError(f'data.seq_len={inputs_length} is too short for span corruption')
  # A shorter final chunk never needs more targets than a full one.
  return t, max(lengths(u)[1] for u in range(2, t + 1))


def _noise_counts(n: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
  noise = min(max(int(round(n * noise_density)), 1), n - 1)
  spans = max(min(int(round(noise / mean_span_length)), noise, n - noise), 1)
  return noise, spans


def _noise_mask(n: int, noise: int, spans: int, rng: np.random.Generator) -> np.ndarray:
  """T5's span layout: alternate non-noise and noise runs, each side cut into ``spans`` runs."""

  def partition(total: int) -> np.ndarray:
    cuts = np.sort(rng.choice(total - 1, spans - 1, replace=False) + 1)
    return np.diff(np.concatenate([[0], cuts, [total]]))

  runs = np.stack([partition(n - noise), partition(noise)], axis=1).reshape(-1)
  return np.repeat(np.tile([False, True], spans), runs)


def span_corruption_examples(ids: Sequence[int], rng: np.random.Generator, *, raw_length: int,
                             noise_density: float, mean_span_length: float,
                             sentinel_ids: Sequence[int], eos_id: int,
                             decoder_start_id: int) -> list[dict]:
  """T5 span corruption of one document, cut into chunks of ``raw_length`` tokens.

  Each chunk's noise spans are replaced by sentinels in the encoder input; the decoder target
  lists ``sentinel_k span_k`` for every span, then eos. Decoder inputs are the targets shifted
  right, starting with ``decoder_start_id``. A chunk needs two tokens (one kept, one noise):
  a one-token document is dropped (counted) and a one-token tail borrows a token.
  """
  ids = np.asarray(ids, np.int32)
  if len(ids) < 2:
    return [dropped_example()]
  bounds = list(range(0, len(ids), raw_length)) + [len(ids)]
  if bounds[-1] - bounds[-2] == 1:
    bounds[-2] -= 1
  out = []
  for k, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
    chunk = ids[s:e]
    noise, spans = _noise_counts(len(chunk), noise_density, mean_span_length)
    if spans > len(sentinel_ids):
      raise ValueError(f'{spans} noise spans need more than the {len(sentinel_ids)} sentinels; '
                       'raise data.num_sentinels or data.mean_noise_span_length')
    is_noise = _noise_mask(len(chunk), noise, spans, rng)
    starts = is_noise & ~np.concatenate([[False], is_noise[:-1]])
    span_index = np.cumsum(starts) - 1
    sentinels = np.asarray(sentinel_ids, np.int32)
    inputs = np.where(starts, sentinels[span_index], chunk)[~is_noise | starts]
    inputs = np.concatenate([inputs, [eos_id]]).astype(np.int32)
    # Targets: each span's tokens preceded by its sentinel.
    noise_starts = starts[is_noise]
    at = np.arange(noise) + np.cumsum(noise_starts)
    targets = np.empty(noise + spans + 1, np.int32)
    targets[at] = chunk[is_noise]
    targets[at[noise_starts] - 1] = sentinels[:spans]
    targets[-1] = eos_id
    dec_in = np.concatenate([[decoder_start_id], targets[:-1]]).astype(np.int32)
    out.append({'encoder_': {'inputs': inputs},
                'decoder_': {'inputs': dec_in, 'targets': targets,
                             'loss_mask': np.ones(len(targets), np.float32)},
                STATS: example_stats(examples=int(k == 0))})
  return out


def prompt_response_sequence(tokenizer, prompt: str, response: str, *, chat_template: bool
                             ) -> tuple[list[int], list[float]]:
  """Token ids of a prompt/response pair and a mask that is 1 on response tokens only.

  With ``chat_template`` the pair is a user turn and an assistant turn (see
  ``Tokenizer.encode_chat``); without it the texts are concatenated as
  ``[bos] prompt response [eos]`` and the response plus eos are trained.
  """
  if chat_template:
    return tokenizer.encode_chat([{'role': 'user', 'content': prompt},
                                  {'role': 'assistant', 'content': response}])
  p, r = tokenizer.encode(prompt), tokenizer.encode(response)
  ids = [tokenizer.bos_id, *p, *r, tokenizer.eos_id]
  return ids, [0.0] * (1 + len(p)) + [1.0] * (len(r) + 1)


def preference_example(chosen: tuple[Sequence[int], Sequence[float]],
                       rejected: tuple[Sequence[int], Sequence[float]], *, seq_len: int,
                       too_long: str) -> dict:
  """One aligned pair: ``chosen_*`` and ``rejected_*`` LM streams (mask = trained targets).

  ``too_long='truncate'`` keeps the first ``seq_len`` targets of each side; a side left with no
  trained target, or any overlong side under ``'drop'``, drops the pair.
  """
  if too_long not in ('truncate', 'drop'):
    raise ValueError(f'data.too_long={too_long!r} cannot split a preference pair; use '
                     '"truncate" or "drop"')
  out: dict = {}
  truncated = 0
  for prefix, (ids, mask) in (('chosen_', chosen), ('rejected_', rejected)):
    ids = np.asarray(ids, np.int32)
    weights = np.asarray(mask, np.float32)[1:]
    n = len(ids) - 1
    if n > seq_len:
      if too_long == 'drop':
        return dropped_example()
      truncated = 1
      n = seq_len
    if not weights[:n].any():
      return dropped_example()
    out[prefix] = {'inputs': ids[:n], 'targets': ids[1:n + 1], 'loss_mask': weights[:n]}
  out[STATS] = example_stats(truncated=truncated)
  return out
