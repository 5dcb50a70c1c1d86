"""tokenizer.json and tokenizer.model folders behind the data.tokenizer interface."""

import pytest

from data.hf_tokenizer import HFTokenizer, load_hf_tokenizer
from data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from tests.hf.conftest import TEXT

CHAT = [{'role': 'system', 'content': 'be brief'}, {'role': 'user', 'content': 'hello'},
        {'role': 'assistant', 'content': 'how are you'}, {'role': 'user', 'content': 'fox?'},
        {'role': 'assistant', 'content': 'the lazy dog'}]


def test_tokenizer_json_matches_transformers(qwen_like):
  transformers = pytest.importorskip('transformers', reason='the hf extra is not installed')
  ours = load_hf_tokenizer(qwen_like)
  theirs = transformers.AutoTokenizer.from_pretrained(qwen_like)
  assert isinstance(ours, HFTokenizer)
  text = 'the lazy fox, today!'
  assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
  assert ours.decode(ours.encode(text)) == text
  assert (ours.eos_id, ours.pad_id) == (theirs.eos_token_id, theirs.pad_token_id)
  ids, mask = ours.encode_chat(CHAT)
  assert ids == list(theirs.apply_chat_template(CHAT, tokenize=True, return_dict=False))
  trained = [i for i, m in zip(ids, mask) if m]
  assert ours.decode(trained) == 'how are you\nthe lazy dog\n'   # the turn through its newline
  assert trained.count(ours.eos_id) == 2   # each assistant turn learns to close itself


def test_tokenizer_model_folder(tmp_path):
  sp = train_sentencepiece(TEXT, vocab_size=320, num_sentinels=0,
                           output_path=str(tmp_path / 'tokenizer.model'))
  loaded = load_hf_tokenizer(str(tmp_path))
  assert isinstance(loaded, SentencePieceTokenizer)
  assert loaded.encode('hello fox') == sp.encode('hello fox')
  assert (loaded.bos_id, loaded.eos_id) == (sp.bos_id, sp.eos_id)


def test_no_tokenizer_files(tmp_path):
  with pytest.raises(FileNotFoundError, match='neither tokenizer.json nor tokenizer.model'):
    load_hf_tokenizer(str(tmp_path))


def test_build_tokenizer_hf(qwen_like):
  from data.tokenizer import build_tokenizer
  assert isinstance(build_tokenizer(f'hf:{qwen_like}'), HFTokenizer)
