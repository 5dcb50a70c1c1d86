"""Transforms: packing isolation and efficiency, MLM and span-corruption statistics, pairs."""

import numpy as np
import pytest

from data import transforms
from model.attention import attention_mask

BOS, EOS = 1, 2


def _documents(n, seed=0, low=3, high=60):
  rng = np.random.default_rng(seed)
  return [rng.integers(10, 300, rng.integers(low, high)).tolist() for _ in range(n)]


def _lm_examples(docs, seq_len=64, too_long='split'):
  return [ex for d in docs for ex in transforms.lm_examples(d, bos_id=BOS, eos_id=EOS,
                                                            seq_len=seq_len, too_long=too_long)]


@pytest.mark.parametrize('method', ['greedy', 'first_fit'])
def test_packing_never_crosses_segments(method):
  examples = _lm_examples(_documents(200))
  packer = transforms.Packer({'': 64}, pad_values={'inputs': 0, 'targets': 0}, method=method)
  rows = packer.pack(examples)
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  seg, pos = batch['segment_ids'], batch['positions']
  mask = np.asarray(attention_mask(seg, seg, causal=True))[:, 0]
  real = seg > 0
  # A real query attends only to keys of its own segment at or before it.
  for b in range(len(rows)):
    same = (seg[b][:, None] == seg[b][None, :]) & real[b][:, None]
    allowed = mask[b] & real[b][:, None]
    assert not (allowed & ~same).any()
    assert (allowed == (same & np.tri(64, dtype=bool))).all()
  assert (batch['loss_mask'][~real] == 0).all()
  # Every example comes back exactly once, intact, with positions restarting at 0.
  got = sorted(tuple(batch['targets'][b][seg[b] == s]) for b in range(len(rows))
               for s in range(1, seg[b].max() + 1))
  assert got == sorted(tuple(ex['']['targets']) for ex in examples)
  starts = real & (pos == 0)
  assert starts.sum() == len(examples)


def test_first_fit_packs_tighter_than_greedy():
  examples = _lm_examples(_documents(400, seed=1, low=5, high=50))
  fill = {}
  for method in ('greedy', 'first_fit'):
    rows = transforms.Packer({'': 64}, method=method).pack(examples)
    fill[method] = sum((r['segment_ids'] > 0).sum() for r in rows) / (64 * len(rows))
  assert fill['first_fit'] > fill['greedy'] and fill['first_fit'] > 0.97


def test_too_long_policies_are_counted():
  doc = list(range(10, 210))   # 202 tokens with bos/eos: 201 targets
  split = transforms.lm_examples(doc, bos_id=BOS, eos_id=EOS, seq_len=64, too_long='split')
  assert [len(e['']['targets']) for e in split] == [64, 64, 64, 9]
  assert sum(e[transforms.STATS][0] for e in split) == 1   # still one example
  trunc = transforms.lm_examples(doc, bos_id=BOS, eos_id=EOS, seq_len=64, too_long='truncate')
  assert len(trunc) == 1 and trunc[0][transforms.STATS].tolist() == [1, 1, 0]
  drop = transforms.lm_examples(doc, bos_id=BOS, eos_id=EOS, seq_len=64, too_long='drop')
  assert transforms.is_dropped(drop[0]) and drop[0][transforms.STATS].tolist() == [0, 0, 1]
  with pytest.raises(ValueError, match='too_long'):
    transforms.lm_examples(doc, bos_id=BOS, eos_id=EOS, seq_len=64, too_long='wrap')


def test_mlm_rates_match_configuration():
  rng = np.random.default_rng(0)
  specials = [0, 1, 2, 3, 4]
  counts = dict(selected=0, masked=0, random=0, kept=0, text=0)
  for doc in _documents(2000, low=40, high=120):
    (ex,) = transforms.mlm_examples(doc, rng, bos_id=BOS, eos_id=EOS, mask_id=4, vocab_low=5,
                                    vocab_high=400, special_ids=specials, seq_len=128,
                                    too_long='truncate')
    inp, tgt, sel = ex['']['inputs'], ex['']['targets'], ex['']['loss_mask'] > 0
    assert not sel[0] and not sel[-1]                 # bos and eos are never selected
    assert (inp[~sel] == tgt[~sel]).all()
    counts['text'] += len(doc)
    counts['selected'] += sel.sum()
    counts['masked'] += (inp[sel] == 4).sum()
    changed = sel & (inp != tgt) & (inp != 4)
    assert not np.isin(inp[changed], specials).any()
    counts['random'] += changed.sum()
  assert abs(counts['selected'] / counts['text'] - 0.15) < 0.005
  # A random replacement equal to the original (1 in 395) counts as kept; close enough.
  assert abs(counts['masked'] / counts['selected'] - 0.8) < 0.02
  assert abs(counts['random'] / counts['selected'] - 0.1) < 0.015


def test_span_corruption_lengths_match_t5():
  # T5's random_spans_helper gives 568 raw tokens and 114 targets for 512 inputs at 15% / 3.
  assert transforms.span_corruption_lengths(512, 0.15, 3.0) == (568, 114)


@pytest.mark.parametrize('density,mean_span', [(0.15, 3.0), (0.5, 8.0)])
def test_span_corruption_statistics_and_reconstruction(density, mean_span):
  seq_len = 128
  raw, target_len = transforms.span_corruption_lengths(seq_len, density, mean_span)
  rng = np.random.default_rng(0)
  sentinels = list(range(1000, 1100))
  noise = spans = total = 0
  for doc in _documents(300, low=2, high=3 * raw):
    restored_doc = []
    examples = transforms.span_corruption_examples(
        doc, rng, raw_length=raw, noise_density=density, mean_span_length=mean_span,
        sentinel_ids=sentinels, eos_id=EOS, decoder_start_id=BOS)
    for ex in examples:
      enc, tgt = ex['encoder_']['inputs'], ex['decoder_']['targets']
      assert len(enc) <= seq_len and len(tgt) <= target_len    # nothing is ever cut
      np.testing.assert_array_equal(ex['decoder_']['inputs'], np.r_[BOS, tgt[:-1]])
      # Filling each sentinel of the input with its span from the targets restores the text.
      is_sent = np.isin(tgt, sentinels)
      pieces = np.split(tgt[:-1], np.nonzero(is_sent)[0])[1:]
      fill = {int(p[0]): p[1:].tolist() for p in pieces}
      restored = []
      for t in enc[:-1]:
        restored += fill.pop(int(t)) if t in sentinels else [int(t)]
      assert not fill
      noise += int(len(tgt) - 1 - is_sent.sum())
      spans += int(is_sent.sum())
      total += len(restored)
      restored_doc += restored
    assert restored_doc == doc
  assert abs(noise / total - density) < 0.02
  assert abs(noise / spans - mean_span) < 0.15 * mean_span


def test_preference_pairs_stay_aligned_in_rows():
  chosen = ([BOS, 10, 11, 20, 21, EOS], [0, 0, 0, 1, 1, 1])
  rejected = ([BOS, 10, 11, 30, EOS], [0, 0, 0, 1, 1])
  ex = transforms.preference_example(chosen, rejected, seq_len=8, too_long='truncate')
  packer = transforms.Packer({'chosen_': 8, 'rejected_': 8}, max_segments=1)
  rows = packer.pack([ex, ex, ex])
  assert len(rows) == 3         # one pair per row, never two
  r = rows[0]
  assert r['chosen_inputs'][:5].tolist() == [BOS, 10, 11, 20, 21]
  assert r['rejected_targets'][:4].tolist() == [10, 11, 30, EOS]
  assert r['chosen_loss_mask'][:5].tolist() == [0, 0, 1, 1, 1]
  assert r['rejected_loss_mask'][:4].tolist() == [0, 0, 1, 1]
  short = transforms.preference_example(chosen, rejected, seq_len=2, too_long='truncate')
  assert transforms.is_dropped(short)   # no response target left after truncation
  with pytest.raises(ValueError, match='cannot split'):
    transforms.preference_example(chosen, rejected, seq_len=8, too_long='split')
