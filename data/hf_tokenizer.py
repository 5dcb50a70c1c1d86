"""Tokenizers of Hugging Face model folders behind data.tokenizer's interface.

`tokenizer.json` (HF tokenizers: Qwen, Llama 3, Mistral, ...) loads as HFTokenizer with the
folder's special tokens and chat template; a folder with only `tokenizer.model` loads as the
SentencePieceTokenizer of data/tokenizer.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

from data.tokenizer import SentencePieceTokenizer, SpecialIds, Tokenizer

NO_ID = -1   # a special this model does not have (e.g. span sentinels in a chat model)


def _token_text(value) -> str | None:
  """tokenizer_config.json writes a special either as a string or as {"content": ...}."""
  return value.get('content') if isinstance(value, dict) else value


class HFTokenizer(Tokenizer):
  """A `tokenizer.json` with the specials and chat template of `tokenizer_config.json`.

  Roles, mask and sentinels are NO_ID: chat structure comes from the model's own template,
  which `encode_chat` renders (loss on the assistant turns' text and their closing tokens).
  A missing pad token falls back to eos, as Hugging Face generation does.
  """

  def __init__(self, folder: str):
    import tokenizers   # part of the hf extra; only this class needs it
    path = os.path.join(folder, 'tokenizer.json')
    self.tok = tokenizers.Tokenizer.from_file(path)
    config_path = os.path.join(folder, 'tokenizer_config.json')
    config = {}
    if os.path.exists(config_path):
      with open(config_path) as f:
        config = json.load(f)
    self.chat_template = config.get('chat_template')
    self.tokens = {k: _token_text(config.get(f'{k}_token')) for k in ('bos', 'eos', 'pad', 'unk')}
    ids = {k: self._id(v) for k, v in self.tokens.items()}
    if ids['eos'] == NO_ID:
      raise ValueError(f'{config_path}: no eos_token; generation and packing need one.')
    self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
    self.ordinary_range = (0, self.vocab_size)
    self.specials = SpecialIds(
        pad=ids['pad'] if ids['pad'] != NO_ID else ids['eos'], bos=ids['bos'], eos=ids['eos'],
        unk=ids['unk'], mask=NO_ID, roles={'system': NO_ID, 'user': NO_ID, 'assistant': NO_ID},
        end_of_turn=ids['eos'], sentinels=())

  def _id(self, text: str | None) -> int:
    found = self.tok.token_to_id(text) if text else None
    return NO_ID if found is None else found

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The model's chat template applied to `messages` (text, specials written out)."""
    if not self.chat_template:
      raise ValueError('This tokenizer_config.json has no chat_template; use a chat model '
                       'folder or set data.chat_template=False.')
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals['raise_exception'] = lambda msg: (_ for _ in ()).throw(ValueError(msg))
    return env.from_string(self.chat_template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt,
        bos_token=self.tokens['bos'] or '', eos_token=self.tokens['eos'] or '')

  def encode_chat(self, messages: Sequence[dict], *, add_bos: bool = True
                  ) -> tuple[list[int], list[float]]:
    """Ids of the rendered template, and a loss mask over each assistant turn: the text after
    its generation prompt up to the end of the turn. `add_bos` is the template's business."""
    text = self.render_chat(messages)
    spans = []
    for k, message in enumerate(messages):
      if message.get('role') == 'assistant':
        start = len(self.render_chat(messages[:k], add_generation_prompt=True))
        end = len(self.render_chat(messages[:k + 1]))
        spans.append((start, end))
    encoding = self.tok.encode(text, add_special_tokens=False)
    mask = [float(any(s <= begin < e for s, e in spans)) for begin, _ in encoding.offsets]
    return encoding.ids, mask


def load_hf_tokenizer(folder: str) -> Tokenizer:
  """The tokenizer of a Hugging Face model folder: tokenizer.json, else tokenizer.model."""
  folder = os.path.expanduser(folder)
  if os.path.exists(os.path.join(folder, 'tokenizer.json')):
    return HFTokenizer(folder)
  if os.path.exists(os.path.join(folder, 'tokenizer.model')):
    return SentencePieceTokenizer(os.path.join(folder, 'tokenizer.model'), num_sentinels=0)
  raise FileNotFoundError(f'{folder} has neither tokenizer.json nor tokenizer.model.')
