"""build_pipeline: batch format, resume exactness and configuration errors."""

import json

import numpy as np
import pytest

from data import pipeline
from data import synthetic
from tests.data.conftest import host, make_config


@pytest.mark.parametrize('packing', ['greedy', 'first_fit'])
def test_lm_batch_is_next_token_within_segments(batch_sharding, packing):
  cfg = make_config(packing=packing)
  p = pipeline.build_pipeline(cfg, batch_sharding)
  b = host(next(p))
  assert set(b) == {'inputs', 'targets', 'segment_ids', 'positions', 'loss_mask'}
  assert all(v.shape == (8, 64) for v in b.values())
  assert b['loss_mask'].dtype == np.float32 and b['inputs'].dtype == np.int32
  seg, pos = b['segment_ids'], b['positions']
  same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
  # Inside a segment the next input is this position's target and positions count up by one.
  np.testing.assert_array_equal(b['inputs'][:, 1:][same], b['targets'][:, :-1][same])
  np.testing.assert_array_equal(pos[:, 1:][same], pos[:, :-1][same] + 1)
  starts = (seg > 0) & ~np.concatenate([np.zeros((8, 1), bool), same], axis=1)
  assert (pos[starts] == 0).all()
  assert (b['loss_mask'][seg == 0] == 0).all() and (b['loss_mask'][seg > 0] == 1).all()
  tok = p.tokenizer
  assert (b['inputs'][pos == 0] == tok.bos_id).any()  # documents start with bos
  assert p.stats()['packing_efficiency'] > 0.5


@pytest.mark.parametrize('task,packing', [('lm', 'greedy'), ('lm', 'first_fit'),
                                          ('mlm', 'greedy'), ('span_corruption', 'first_fit')])
def test_resume_from_state_yields_identical_batches(batch_sharding, task, packing):
  cfg = make_config(task=task, packing=packing, pack_window=16)
  p = pipeline.build_pipeline(cfg, batch_sharding)
  for _ in range(3):
    next(p)
  state = p.get_state()
  expected = [host(next(p)) for _ in range(4)]
  q = pipeline.build_pipeline(cfg, batch_sharding)
  q.set_state(state)
  for want in expected:
    got = host(next(q))
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  assert q.stats()['examples'] == p.stats()['examples']


def test_vocab_that_does_not_fit_the_model_is_rejected(batch_sharding):
  with pytest.raises(ValueError, match='model embeds only 256'):
    pipeline.build_pipeline(make_config(), batch_sharding, model_vocab_size=256)
  p = pipeline.build_pipeline(make_config(), batch_sharding, model_vocab_size=512)
  assert p.tokenizer.vocab_size <= 512


@pytest.mark.parametrize('task', pipeline.TASKS)
def test_every_task_yields_its_batch_format(batch_sharding, task):
  cfg = make_config(task=task, too_long='truncate' if task == 'preference' else 'split')
  p = pipeline.build_pipeline(cfg, batch_sharding)
  spec = pipeline.batch_spec(cfg)
  b = host(next(p))
  assert set(b) == set(spec)
  for k, (n, dt) in spec.items():
    assert b[k].shape == (8, n) and b[k].dtype == dt, k
  for prefix in {k[:-len('segment_ids')] for k in spec if k.endswith('segment_ids')}:
    seg = b[prefix + 'segment_ids']
    assert (b[prefix + 'positions'][seg == 0] == 0).all()
    if prefix + 'loss_mask' in b:
      assert (b[prefix + 'loss_mask'][seg == 0] == 0).all() and b[prefix + 'loss_mask'].any()


def test_span_corruption_decoder_inputs_are_targets_shifted_within_segments(batch_sharding):
  cfg = make_config(task='span_corruption', seq_len=32)
  p = pipeline.build_pipeline(cfg, batch_sharding)
  b = host(next(p))
  seg, pos = b['decoder_segment_ids'], b['decoder_positions']
  start = (seg > 0) & (pos == 0)
  assert (b['decoder_inputs'][start] == p.tokenizer.bos_id).all()
  inner = (seg[:, 1:] > 0) & (pos[:, 1:] > 0)
  np.testing.assert_array_equal(b['decoder_inputs'][:, 1:][inner],
                                b['decoder_targets'][:, :-1][inner])
  assert b['encoder_segment_ids'].max() >= 1
  assert b['decoder_targets'].shape[1] == pipeline.target_length(cfg)
  with pytest.raises(ValueError, match='target_len=3 is shorter'):
    pipeline.build_pipeline(make_config(task='span_corruption', target_len=3), batch_sharding)


def _segments(b, key, prefix=''):
  """(row, segment) -> token ids of `key` where the loss mask is on."""
  out = {}
  seg = b[prefix + 'segment_ids']
  for r in range(seg.shape[0]):
    for s in range(1, seg[r].max() + 1):
      sel = (seg[r] == s) & (b[prefix + 'loss_mask'][r] > 0)
      out[r, s] = b[prefix + key][r][sel]
  return out


def test_sft_trains_on_responses_only(batch_sharding, tmp_path):
  path = tmp_path / 'sft.jsonl'
  pairs = {f'question {i}?': f'answer {i}.' for i in range(40)}
  path.write_text('\n'.join(json.dumps({'prompt': q, 'response': a}) for q, a in pairs.items()))
  for template in (True, False):
    cfg = make_config(task='sft', source=f'sft_jsonl:{path}', chat_template=template,
                      data_dir=str(tmp_path / 'tfds'))
    p = pipeline.build_pipeline(cfg, batch_sharding)
    b = host(next(p))
    trained = [p.tokenizer.decode(t) for t in _segments(b, 'targets').values()]
    assert trained and all(t in pairs.values() for t in trained)
    whole = [p.tokenizer.decode(b['inputs'][r][b['segment_ids'][r] == s])
             for r, s in _segments(b, 'targets')]
    assert all(w[:w.index('?') + 1] in pairs for w in whole)


def test_preference_rows_pair_each_chosen_with_its_rejected(batch_sharding):
  cfg = make_config(task='preference', too_long='truncate', seq_len=512)
  p = pipeline.build_pipeline(cfg, batch_sharding)
  b = host(next(p))
  tok = p.tokenizer
  for r in range(8):
    prompt = {side: b[f'{side}_inputs'][r][(b[f'{side}_loss_mask'][r] == 0)
                                           & (b[f'{side}_segment_ids'][r] > 0)]
              for side in ('chosen', 'rejected')}
    np.testing.assert_array_equal(prompt['chosen'], prompt['rejected'])
    chosen = tok.decode(b['chosen_targets'][r][b['chosen_loss_mask'][r] > 0])
    rejected = tok.decode(b['rejected_targets'][r][b['rejected_loss_mask'][r] > 0])
    answer = synthetic.extract_answer(chosen)
    assert answer is not None and not synthetic.verify(rejected, answer)
  assert (b['chosen_segment_ids'] <= 1).all()     # one pair per row


@pytest.mark.parametrize('policy', ['truncate', 'drop'])
def test_too_long_examples_are_counted(batch_sharding, policy):
  cfg = make_config(too_long=policy, seq_len=128)
  p = pipeline.build_pipeline(cfg, batch_sharding)
  b = host(next(p))
  stats = p.stats()
  assert stats['truncated' if policy == 'truncate' else 'dropped'] > 0
  assert stats['dropped' if policy == 'truncate' else 'truncated'] == 0
  if policy == 'drop':   # only whole problems remain: each segment ends with eos
    seg = b['segment_ids']
    last = (seg > 0) & (np.concatenate([seg[:, 1:], np.zeros((8, 1), int)], axis=1) != seg)
    assert (b['targets'][last] == p.tokenizer.eos_id).all()
  with pytest.raises(ValueError, match='a whole epoch'):
    next(pipeline.build_pipeline(make_config(too_long='drop', seq_len=16), batch_sharding))


def test_one_epoch_reads_every_record_once_then_stops(batch_sharding, tmp_path):
  path = tmp_path / 'docs.txt'
  docs = [f'document number {i}' for i in range(37)]
  path.write_text('\n'.join(docs) + '\n')
  cfg = make_config(source=f'text:{path}', text_unit='line', num_epochs=1,
                    data_dir=str(tmp_path / 'tfds'))
  p = pipeline.build_pipeline(cfg, batch_sharding)
  seen = []
  batches = list(p)
  for b in map(host, batches):
    for r in range(8):
      for s in range(1, b['segment_ids'][r].max() + 1):
        seen.append(p.tokenizer.decode(b['inputs'][r][b['segment_ids'][r] == s]))
  assert sorted(seen) == sorted(docs)
  assert (host(batches[-1])['segment_ids'][-1] == 0).all()   # the last batch is padded
  assert p.stats()['examples'] == 37
  with pytest.raises(StopIteration):
    next(p)


def test_eval_split_is_fixed_and_disjoint_from_train(batch_sharding):
  cfg = make_config()
  first = host(next(pipeline.build_pipeline(cfg, batch_sharding, split='test')))
  again = host(next(pipeline.build_pipeline(cfg, batch_sharding, split='test')))
  np.testing.assert_array_equal(first['inputs'], again['inputs'])
  train = host(next(pipeline.build_pipeline(cfg, batch_sharding)))
  assert not np.array_equal(first['inputs'], train['inputs'])


def test_worker_processes_resume_exactly(batch_sharding):
  cfg = make_config(worker_count=2)
  p = pipeline.build_pipeline(cfg, batch_sharding)
  for _ in range(2):
    next(p)
  state = p.get_state()
  want = [host(next(p)) for _ in range(3)]
  p.close()
  q = pipeline.build_pipeline(cfg, batch_sharding)
  q.set_state(state)
  got = [host(next(q)) for _ in range(3)]
  q.close()
  for w, g in zip(want, got):
    for k in w:
      np.testing.assert_array_equal(g[k], w[k])


def test_configuration_errors_are_explained(batch_sharding):
  with pytest.raises(ValueError, match='data.task'):
    pipeline.build_pipeline(make_config(task='clm'), batch_sharding)
  with pytest.raises(ValueError, match='cannot split a preference pair'):
    pipeline.build_pipeline(make_config(task='preference'), batch_sharding)
  with pytest.raises(ValueError, match='data.too_long'):
    pipeline.build_pipeline(make_config(too_long='wrap'), batch_sharding)


def test_each_epoch_is_a_new_permutation_of_the_data(batch_sharding, tmp_path):
  path = tmp_path / 'docs.txt'
  docs = [f'doc {i:02d}' for i in range(32)]
  path.write_text('\n'.join(docs) + '\n')
  cfg = make_config(source=f'text:{path}', text_unit='line', num_epochs=2, seq_len=16,
                    data_dir=str(tmp_path / 'tfds'))
  p = pipeline.build_pipeline(cfg, batch_sharding)
  order = [p.tokenizer.decode(row[seg == s]) for b in map(host, p)
           for row, seg in zip(b['inputs'], b['segment_ids']) for s in range(1, seg.max() + 1)]
  first, second = order[:32], order[32:]
  assert sorted(first) == sorted(second) == docs
  assert first != second and first != docs
