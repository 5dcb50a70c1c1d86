"""Tokenizers of Hugging Face model folders behind data.tokenizer's interface.

`tokenizer.json` (HF tokenizers: Qwen, Llama 3, Mistral, ...) loads as HFTokenizer; a folder
with only `tokenizer.model` (SentencePiece: Llama 2, Mistral v0.1, T5, ...) as
HFSentencePieceTokenizer. Both take the folder's special tokens and its chat template
(`tokenizer_config.json` "chat_template", or `chat_template.jinja`); chats in a folder without
one are refused rather than given seedling's own template, whose role markers the model never saw.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2, sentencepiece_pb2

from data.tokenizer import SpecialIds, Tokenizer

NO_ID = -1   # a special this model does not have (e.g. span sentinels in a chat model)
SPECIAL_NAMES = ('bos', 'eos', 'pad', 'unk', 'mask')


def _token_text(value) -> str | None:
  """tokenizer_config.json writes a special either as a string or as {"content": ...}."""
  return value.get('content') if isinstance(value, dict) else value


def _chat_template(folder: str, config: dict) -> str | None:
  """The folder's chat template: tokenizer_config.json's (a string, or named templates of which
  'default' is used), else chat_template.jinja (where transformers 5 saves it), else None."""
  template = config.get('chat_template')
  if isinstance(template, list):
    template = {t.get('name'): t.get('template') for t in template}.get('default')
  path = os.path.join(folder, 'chat_template.jinja')
  if not template and os.path.exists(path):
    with open(path) as f:
      template = f.read()
  return template or None


class FolderTokenizer(Tokenizer):
  """What both folder layouts share: tokenizer_config.json's specials and the model's chat
  template, which `encode_chat` renders (loss on the assistant turns' text and their closing
  tokens). Roles, mask (unless the config names one) and sentinels are NO_ID; a missing pad
  token falls back to eos, as Hugging Face generation does."""

  def _read_config(self, folder: str) -> dict:
    self.folder = folder
    path = os.path.join(folder, 'tokenizer_config.json')
    config = {}
    if os.path.exists(path):
      with open(path) as f:
        config = json.load(f)
    self.chat_template = _chat_template(folder, config)
    self.tokens = {k: _token_text(config.get(f'{k}_token')) for k in SPECIAL_NAMES}
    return config

  def _set_specials(self, ids: dict[str, int]) -> None:
    if ids['eos'] == NO_ID:
      raise ValueError(f'{self.folder}: no eos token (tokenizer_config.json eos_token); '
                       'generation and packing need one.')
    self.specials = SpecialIds(
        pad=ids['pad'] if ids['pad'] != NO_ID else ids['eos'], bos=ids['bos'], eos=ids['eos'],
        unk=ids['unk'], mask=ids['mask'],
        roles={'system': NO_ID, 'user': NO_ID, 'assistant': NO_ID}, end_of_turn=ids['eos'],
        sentinels=())

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
    """Ids of `text` with special tokens written out in it, and each id's first character."""
    raise NotImplementedError

  def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The model's chat template applied to `messages` (text, specials written out)."""
    if not self.chat_template:
      raise ValueError(f'{self.folder} has no chat template (tokenizer_config.json '
                       '"chat_template" or chat_template.jinja); seedling will not substitute '
                       'its own, whose role markers the model never saw. Use a chat model folder '
                       'or set data.chat_template=False.')
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
    ids, starts = self.encode_with_offsets(text)
    return ids, [float(any(s <= begin < e for s, e in spans)) for begin in starts]


class HFTokenizer(FolderTokenizer):
  """A `tokenizer.json` with the specials and chat template of its folder."""

  def __init__(self, folder: str):
    import tokenizers   # part of the hf extra; only this class needs it
    self.tok = tokenizers.Tokenizer.from_file(os.path.join(folder, 'tokenizer.json'))
    self._read_config(folder)
    self._set_specials({k: self._id(v) for k, v in self.tokens.items()})
    self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
    self.ordinary_range = (0, self.vocab_size)

  def _id(self, text: str | None) -> int:
    found = self.tok.token_to_id(text) if text else None
    return NO_ID if found is None else found

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
    encoding = self.tok.encode(text, add_special_tokens=False)
    return encoding.ids, [begin for begin, _ in encoding.offsets]


class HFSentencePieceTokenizer(FolderTokenizer):
  """A folder's `tokenizer.model` with the specials and chat template of tokenizer_config.json.

  Specials come from the config (its *_token entries and added_tokens_decoder), else from the
  model's own pieces. In chat text, special tokens written out become their ids and the text
  between them is encoded as transformers 5 does: SentencePiece's leading space ('▁') only at
  the start of the text, or before every piece of text if the config says "legacy": true.
  """

  def __init__(self, folder: str):
    self.sp = spm.SentencePieceProcessor(model_file=os.path.join(folder, 'tokenizer.model'))
    config = self._read_config(folder)
    proto = sentencepiece_model_pb2.ModelProto.FromString(self.sp.serialized_model_proto())
    proto.normalizer_spec.add_dummy_prefix = False
    self.sp_inner = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    self.legacy = bool(config.get('legacy', False))
    self.added = {_token_text(v): int(k)
                  for k, v in (config.get('added_tokens_decoder') or {}).items()}
    own = {'bos': self.sp.bos_id(), 'eos': self.sp.eos_id(), 'pad': self.sp.pad_id(),
           'unk': self.sp.unk_id(), 'mask': NO_ID}
    self._set_specials({k: self._id(self.tokens[k], own[k]) for k in SPECIAL_NAMES})
    for k in SPECIAL_NAMES:   # a special known only by its id is still written in chat text
      if self.tokens[k] is None and getattr(self.specials, k) >= 0:
        self.tokens[k] = self.sp.id_to_piece(getattr(self.specials, k))
    self.written = {t: i for t, i in ((t, self._id(t, NO_ID)) for t in self.tokens.values() if t)
                    if i != NO_ID}
    self.written.update(self.added)
    self.split = re.compile('(' + '|'.join(map(re.escape, sorted(self.written, key=len,
                                                                 reverse=True))) + ')')
    self.vocab_size = max([self.sp.get_piece_size(), *(i + 1 for i in self.added.values())])
    self.ordinary_range = (0, self.sp.get_piece_size())

  def _id(self, text: str | None, default: int) -> int:
    """Id of a special's text: an added token, else a piece of the model, else `default`."""
    if not text:
      return default   # SentencePiece's own ids are -1 (= NO_ID) when the model has none
    if text in self.added:
      return self.added[text]
    found = self.sp.piece_to_id(text)
    return found if self.sp.id_to_piece(found) == text else default

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    """Pieces back to text; specials and added tokens are dropped."""
    skip = set(self.written.values())
    return self.sp.decode([int(i) for i in ids
                           if int(i) not in skip and 0 <= int(i) < self.sp.get_piece_size()])

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
    ids, starts, at = [], [], 0
    for chunk in self.split.split(text):
      if chunk in self.written:
        ids.append(self.written[chunk])
        starts.append(at)
      elif chunk:
        char_of_byte = [i for i, c in enumerate(chunk) for _ in c.encode()] + [len(chunk)]
        # Serialized protos (piece ids with UTF-8 byte offsets) read alike in every
        # sentencepiece >= 0.2.0; protobuf comes with orbax.
        sp = self.sp if at == 0 or self.legacy else self.sp_inner
        proto = sentencepiece_pb2.SentencePieceText.FromString(
            sp.encode(chunk, out_type='serialized_proto'))
        for piece in proto.pieces:
          ids.append(piece.id)
          starts.append(at + char_of_byte[piece.begin])
      at += len(chunk)
    return ids, starts


def load_hf_tokenizer(folder: str) -> Tokenizer:
  """The tokenizer of a Hugging Face model folder: tokenizer.json, else tokenizer.model."""
  folder = os.path.expanduser(folder)
  if os.path.exists(os.path.join(folder, 'tokenizer.json')):
    return HFTokenizer(folder)
  if os.path.exists(os.path.join(folder, 'tokenizer.model')):
    return HFSentencePieceTokenizer(folder)
  raise FileNotFoundError(f'{folder} has neither tokenizer.json nor tokenizer.model.')
