"""tokenizer.json and tokenizer.model folders behind the data.tokenizer interface."""

import json

import pytest

from data.hf_tokenizer import HFSentencePieceTokenizer, HFTokenizer, load_hf_tokenizer
from data.tokenizer import train_sentencepiece
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


LLAMA2_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}{% elif m['role'] == 'system' %}"
    "{{ '<<SYS>>' + m['content'] + '<</SYS>>' }}"
    "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")


def test_tokenizer_model_folder_uses_the_model_chat_template(tmp_path):
  transformers = pytest.importorskip('transformers', reason='the hf extra is not installed')
  sp = train_sentencepiece(TEXT, vocab_size=320, num_sentinels=0,
                           output_path=str(tmp_path / 'tokenizer.model'))
  config = dict(bos_token='<s>', eos_token='</s>', unk_token='<unk>',
                tokenizer_class='LlamaTokenizer')
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps(config))
  loaded = load_hf_tokenizer(str(tmp_path))
  assert isinstance(loaded, HFSentencePieceTokenizer)
  assert loaded.encode('hello fox') == sp.encode('hello fox')
  assert (loaded.bos_id, loaded.eos_id, loaded.vocab_size) == (sp.bos_id, sp.eos_id, 320)
  with pytest.raises(ValueError, match='has no chat template.*data.chat_template=False'):
    loaded.encode_chat(CHAT)
  # The template as transformers 5 saves it (chat_template.jinja), then in the config with
  # "legacy": true (a leading space before the text after each special token).
  (tmp_path / 'chat_template.jinja').write_text(LLAMA2_TEMPLATE)
  for legacy in (None, True):
    if legacy:
      (tmp_path / 'chat_template.jinja').unlink()
      (tmp_path / 'tokenizer_config.json').write_text(json.dumps(
          dict(config, chat_template=LLAMA2_TEMPLATE, legacy=True)))
    ours = load_hf_tokenizer(str(tmp_path))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for chat in (CHAT, CHAT[1:]):   # starting with text, and with bos
      ids, mask = ours.encode_chat(chat)
      assert ids == list(theirs.apply_chat_template(chat, tokenize=True, return_dict=False))
    trained = [i for i, m in zip(ids, mask) if m]
    assert ours.decode(trained) == 'how are you  the lazy dog '
    assert trained.count(ours.eos_id) == 2 and ours.bos_id not in trained


def test_no_tokenizer_files(tmp_path):
  with pytest.raises(FileNotFoundError, match='neither tokenizer.json nor tokenizer.model'):
    load_hf_tokenizer(str(tmp_path))


def test_build_tokenizer_hf(qwen_like):
  from data.tokenizer import build_tokenizer
  assert isinstance(build_tokenizer(f'hf:{qwen_like}'), HFTokenizer)
