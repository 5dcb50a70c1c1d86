"""Tokenizers: exact round trips, reserved ids, loading real models, the chat template."""

import pytest

from data import synthetic
from data import tokenizer as tokenizer_lib

TEXTS = {
    'english': '  The quick brown fox\tjumps over the lazy dog.\n\nIt\'s 3.14 -- "quoted"  end  ',
    'chinese': '学而时习之，不亦说乎？有朋自远方来，不亦乐乎？ 鸡兔同笼：共有35个头，94只脚。',
    'code': 'def f(x):\n    return {"a": [x ** 2, x // 3]}  # note\n\tif x != 0:\r\n  pass\n',
    'unseen': 'emoji 🙂, rare 龘 and ∮ symbols',
}


def _corpus() -> list[str]:
  problems = synthetic.SyntheticProblems(num_examples=300)
  return [problems[i]['question'] + '\n' + problems[i]['answer'] for i in range(300)] + [
      TEXTS['english'], TEXTS['chinese'], TEXTS['code']]


@pytest.fixture(scope='module', params=['bpe', 'unigram'])
def trained(request):
  return tokenizer_lib.train_sentencepiece(_corpus(), vocab_size=700, model_type=request.param)


@pytest.mark.parametrize('name', TEXTS)
def test_byte_tokenizer_round_trips_exactly(name):
  tok = tokenizer_lib.ByteTokenizer()
  ids = tok.encode(TEXTS[name])
  assert tok.decode(ids) == TEXTS[name]
  assert min(ids) >= tok.ordinary_range[0] and max(ids) < tok.vocab_size <= 512
  assert not set(ids) & tok.special_id_set()


@pytest.mark.parametrize('name', TEXTS)
def test_trained_sentencepiece_round_trips_exactly(trained, name):
  ids = trained.encode(TEXTS[name])
  assert trained.decode(ids) == TEXTS[name]
  assert not set(ids) & trained.special_id_set()


def test_trained_sentencepiece_reserves_specials_as_controls(trained, tmp_path):
  s = trained.specials
  ids = [s.pad, s.bos, s.eos, s.unk, s.mask, s.end_of_turn, *s.roles.values(), *s.sentinels]
  assert len(set(ids)) == len(ids) == 9 + 100
  assert max(ids) < trained.vocab_size == trained.piece_size   # all inside the trained model
  # Typing a special's name in text never produces the special id.
  assert trained.mask_id not in trained.encode('<mask> <|user|> <extra_id_0>')
  assert trained.decode([trained.bos_id, *trained.encode('hi'), trained.mask_id]) == 'hi'
  path = tmp_path / 'spm.model'
  tokenizer_lib.train_sentencepiece(_corpus()[:50], vocab_size=500, output_path=str(path))
  loaded = tokenizer_lib.build_tokenizer(f'sentencepiece:{path}')
  assert loaded.decode(loaded.encode(TEXTS['chinese'])) == TEXTS['chinese']


def test_llama2_model_loads_with_explicit_specials(shared_datasets):
  path = shared_datasets / 'tokenizers' / 'llama2_sentencepiece' / 'tokenizer.model'
  tok = tokenizer_lib.SentencePieceTokenizer(str(path))
  assert (tok.bos_id, tok.eos_id, tok.specials.unk) == (1, 2, 0)
  # No pad, mask, chat markers or sentinels in Llama 2: they are appended after its 32000 pieces.
  assert tok.pad_id == 32000 and tok.vocab_size == 32000 + 1 + 1 + 4 + 100
  for name in ('english', 'chinese', 'code', 'unseen'):
    assert tok.decode(tok.encode(TEXTS[name])) == TEXTS[name]
  assert tokenizer_lib.SentencePieceTokenizer(str(path), pad_id=0).pad_id == 0


def test_maxtext_model_loads(shared_datasets):
  path = shared_datasets / 'tokenizers' / 'maxtext_c4_sentencepiece' / 'tokenizer.model'
  tok = tokenizer_lib.build_tokenizer(f'sentencepiece:{path}')
  assert tok.piece_size == 32768 and tok.pad_id >= 32768
  assert tok.decode(tok.encode('The quick brown fox.')) == 'The quick brown fox.'


def test_chat_template_trains_assistant_turns_only():
  tok = tokenizer_lib.ByteTokenizer()
  messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi?'},
              {'role': 'assistant', 'content': 'Hello.'}, {'role': 'user', 'content': '2+2'},
              {'role': 'assistant', 'content': '4'}]
  ids, mask = tok.encode_chat(messages)
  assert len(ids) == len(mask) and ids[0] == tok.bos_id and ids[-1] == tok.eos_id
  trained = tok.decode([i for i, m in zip(ids, mask) if m])
  assert trained == 'Hello.4'
  trained_ids = [i for i, m in zip(ids, mask) if m]
  assert trained_ids.count(tok.specials.end_of_turn) == 2 and trained_ids[-1] == tok.eos_id
  assert tok.decode(ids) == 'Be brief.Hi?Hello.2+24'
  with pytest.raises(ValueError, match='role'):
    tok.encode_chat([{'role': 'robot', 'content': 'x'}])


def test_bad_tokenizer_names_are_explained(tmp_path):
  with pytest.raises(ValueError, match='not understood'):
    tokenizer_lib.build_tokenizer('wordpiece')
  with pytest.raises(FileNotFoundError, match='does not exist'):
    tokenizer_lib.build_tokenizer(f'sentencepiece:{tmp_path}/missing.model')
