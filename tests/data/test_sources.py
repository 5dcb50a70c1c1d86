"""File and TFDS sources: the shared datasets load, preparation is cached, bad input is reported."""

import json
import os

import pytest

from data import pipeline
from data import sources
from data import synthetic
from tests.data.conftest import host, make_config


def _open(spec, tmp_path, split='train', **kw):
  return sources.open_source(spec, split, data_dir=str(tmp_path / 'tfds'), **kw)


def _text(v):
  return v.decode() if isinstance(v, bytes) else v


def test_tinyshakespeare_as_text(shared_datasets, tmp_path, batch_sharding):
  path = shared_datasets / 'tinyshakespeare' / 'input.txt'
  src = _open(f'text:{path}', tmp_path)
  assert len(src.records) == 1
  assert _text(src.records[0]['text']) == path.read_text()
  cfg = make_config(source=f'text:{path}', data_dir=str(tmp_path / 'tfds'))
  b = host(next(pipeline.build_pipeline(cfg, batch_sharding)))
  assert b['segment_ids'].min() == 1     # one long document, split into full rows


def test_chinese_poetry_as_json_text(shared_datasets, tmp_path):
  lunyu = _open(f'text:{shared_datasets}/chinese_poetry/lunyu.json', tmp_path,
                text_field='paragraphs')
  assert len(lunyu.records) == 20
  shijing = _open(f'text:{shared_datasets}/chinese_poetry/shijing.json', tmp_path,
                  text_field='content')
  texts = {_text(shijing.records[i]['text']) for i in range(len(shijing.records))}
  assert len(shijing.records) == 305 and any(t.startswith('关关雎鸠') for t in texts)


def test_gsm8k_source(shared_datasets, tmp_path):
  src = _open(f'gsm8k:{shared_datasets}/gsm8k/train.jsonl', tmp_path)
  assert len(src.records) == 7473 and src.skipped == 0
  r = src.records[5]
  assert synthetic.verify(_text(r['answer']), _text(r['final_answer']))


def test_alpaca_as_sft(shared_datasets, tmp_path, batch_sharding):
  path = shared_datasets / 'alpaca' / 'alpaca_data_first400.json'
  src = _open(f'sft_jsonl:{path}', tmp_path)
  assert len(src.records) == 400
  prompts = [_text(src.records[i]['prompt']) for i in range(400)]
  assert sum('\n\n' in p for p in prompts) >= 197   # instructions with an input
  cfg = make_config(task='sft', source=f'sft_jsonl:{path}', data_dir=str(tmp_path / 'tfds'))
  b = host(next(pipeline.build_pipeline(cfg, batch_sharding)))
  assert 0 < b['loss_mask'].sum() < (b['segment_ids'] > 0).sum()


def test_hh_rlhf_as_preference(shared_datasets, tmp_path):
  path = shared_datasets / 'hh-rlhf' / 'harmless-base_test_first_half.jsonl'
  src = _open(f'preference_jsonl:{path}', tmp_path)
  assert len(src.records) == 1156
  with open(path) as f:
    originals = {json.loads(line)['chosen'] for line in f}
  for i in range(0, 1156, 97):
    r = {k: _text(v) for k, v in src.records[i].items()}
    assert r['prompt'].endswith('\n\nAssistant:')
    assert r['prompt'] + r['chosen'] in originals
    assert '\n\nAssistant:' not in r['chosen']


def test_prepared_sources_are_reused_until_the_file_changes(tmp_path):
  path = tmp_path / 'docs.txt'
  path.write_text('one\ntwo\nthree\n')
  first = sources.prepare('text', str(path), str(tmp_path / 'tfds'), text_unit='line')
  files = sorted(p for p in first.data_path.iterdir())
  stamps = [os.stat(p).st_mtime_ns for p in files]
  again = sources.prepare('text', str(path), str(tmp_path / 'tfds'), text_unit='line')
  assert again.data_path == first.data_path
  assert [os.stat(p).st_mtime_ns for p in files] == stamps   # nothing rewritten
  path.write_text('one\ntwo\nthree\nfour\n')
  changed = sources.prepare('text', str(path), str(tmp_path / 'tfds'), text_unit='line')
  assert changed.data_path != first.data_path
  assert len(changed.as_data_source('train')) == 4


def test_prepared_dataset_loads_by_name_through_tfds(tmp_path):
  path = tmp_path / 'sft.jsonl'
  path.write_text('\n'.join(json.dumps({'prompt': f'p{i}', 'response': f'r{i}'})
                            for i in range(10)))
  builder = sources.prepare('sft_jsonl', str(path), str(tmp_path / 'tfds'))
  by_name = _open(f'tfds:{builder.name}/{builder.builder_config.name}', tmp_path)
  assert len(by_name.records) == 10
  assert {_text(by_name.records[i]['prompt']) for i in range(10)} == {f'p{i}' for i in range(10)}


def test_eval_fraction_holds_out_a_disjoint_tail(tmp_path):
  path = tmp_path / 'docs.txt'
  path.write_text(''.join(f'doc {i}\n' for i in range(100)))
  kw = dict(text_unit='line', eval_fraction=0.1)
  train = _open(f'text:{path}', tmp_path, **kw).records
  held = _open(f'text:{path}', tmp_path, split='test', **kw).records
  a = {train[i]['text'] for i in range(len(train))}
  b = {held[i]['text'] for i in range(len(held))}
  assert len(a) == 90 and len(b) == 10 and not a & b
  with pytest.raises(ValueError, match='eval_fraction'):
    _open(f'text:{path}', tmp_path, split='test', text_unit='line')


def _write_jsonl(path, lines):
  path.write_text('\n'.join(lines) + '\n')


def test_malformed_json_line_reports_file_and_line(tmp_path):
  path = tmp_path / 'bad.jsonl'
  _write_jsonl(path, [json.dumps({'prompt': 'a', 'response': 'b'}), '',
                      '{"prompt": "a", "response": ', json.dumps({'prompt': 'c',
                                                                   'response': 'd'})])
  with pytest.raises(sources.BadRecord, match=rf'{path}:3: malformed JSON.*bad_lines="skip"'):
    _open(f'sft_jsonl:{path}', tmp_path)
  src = _open(f'sft_jsonl:{path}', tmp_path, bad_lines='skip')
  assert len(src.records) == 2 and src.skipped == 1
  assert src.skip_reasons[0].startswith(f'{path}:3: malformed JSON')


def test_skipped_lines_reach_pipeline_stats(tmp_path, batch_sharding):
  path = tmp_path / 'bad.jsonl'
  _write_jsonl(path, ['{oops'] + [json.dumps({'question': f'q{i}', 'answer': f'a\n#### {i}'})
                                  for i in range(20)])
  cfg = make_config(source=f'gsm8k:{path}', bad_lines='skip', data_dir=str(tmp_path / 'tfds'))
  p = pipeline.build_pipeline(cfg, batch_sharding)
  assert p.stats()['source_skipped'] == 1 and p.stats()['records'] == 20


def test_missing_field_is_named(tmp_path):
  path = tmp_path / 'pref.jsonl'
  _write_jsonl(path, [json.dumps({'prompt': 'p', 'chosen': 'a', 'rejected': 'b'}),
                      json.dumps({'prompt': 'p', 'chosen': 'a'})])
  with pytest.raises(sources.BadRecord, match=rf'{path}:2: missing field "rejected"'):
    _open(f'preference_jsonl:{path}', tmp_path)
  gsm = tmp_path / 'gsm.jsonl'
  _write_jsonl(gsm, [json.dumps({'question': 'q', 'answer': 'no final line'})])
  with pytest.raises(sources.BadRecord, match=r'gsm.jsonl:1: "answer" has no final "####'):
    _open(f'gsm8k:{gsm}', tmp_path)
  hh = tmp_path / 'hh.jsonl'
  _write_jsonl(hh, [json.dumps({'chosen': '\n\nHuman: a\n\nAssistant: b',
                                'rejected': '\n\nHuman: X\n\nAssistant: c'})])
  with pytest.raises(sources.BadRecord, match='do not share the prompt'):
    _open(f'preference_jsonl:{hh}', tmp_path)


def test_empty_sources_are_explained(tmp_path):
  empty = tmp_path / 'empty.jsonl'
  empty.write_text('\n')
  with pytest.raises(ValueError, match='produced no records'):
    _open(f'sft_jsonl:{empty}', tmp_path)
  folder = tmp_path / 'nothing'
  folder.mkdir()
  with pytest.raises(ValueError, match='holds no'):
    _open(f'text:{folder}', tmp_path)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    _open(f'text:{tmp_path}/missing.txt', tmp_path)
  with pytest.raises(ValueError, match='unknown kind'):
    _open('csv:/x', tmp_path)
  with pytest.raises(FileNotFoundError, match='not prepared'):
    _open('tfds:mnist', tmp_path)
