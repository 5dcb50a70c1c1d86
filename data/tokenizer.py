"""Tokenizers behind one interface: a byte-level tokenizer that needs no files, and SentencePiece.

Every tokenizer exposes explicit special ids (pad, bos, eos, mask, chat role markers and span
sentinels) so transforms never guess them. ``encode`` never adds bos/eos; transforms do.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

ROLES = ('system', 'user', 'assistant')
CONTROL_NAMES = ('<pad>', '<s>', '</s>', '<unk>', '<mask>', '<|system|>', '<|user|>',
                 '<|assistant|>', '<|end|>')


def sentinel_piece(i: int) -> str:
  """The T5-style name of sentinel ``i``."""
  return f'<extra_id_{i}>'


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """Ids a tokenizer reserves outside ordinary text."""
  pad: int
  bos: int
  eos: int
  unk: int
  mask: int
  roles: dict[str, int]        # role name -> marker id opening that role's turn
  end_of_turn: int
  sentinels: tuple[int, ...]   # sentinel k replaces the k-th corrupted span


class Tokenizer:
  """Common interface: ``encode``/``decode`` plus the special ids, which never come from text."""

  vocab_size: int
  specials: SpecialIds
  ordinary_range: tuple[int, int]   # [low, high) holding every text token (specials excluded apart)

  @property
  def pad_id(self) -> int:
    return self.specials.pad

  @property
  def bos_id(self) -> int:
    return self.specials.bos

  @property
  def eos_id(self) -> int:
    return self.specials.eos

  @property
  def mask_id(self) -> int:
    return self.specials.mask

  @property
  def sentinel_ids(self) -> tuple[int, ...]:
    return self.specials.sentinels

  def special_id_set(self) -> frozenset[int]:
    """All reserved ids; MLM never substitutes them as random tokens."""
    s = self.specials
    return frozenset((s.pad, s.bos, s.eos, s.unk, s.mask, s.end_of_turn, *s.roles.values(),
                      *s.sentinels))

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def decode(self, ids: Iterable[int]) -> str:
    raise NotImplementedError

  def encode_chat(self, messages: Sequence[dict], *, add_bos: bool = True
                  ) -> tuple[list[int], list[float]]:
    """Chat template: ``[bos] (<|role|> text <|end|>)* [eos]`` with loss on assistant turns only.

    The loss mask is aligned with the returned ids and covers each assistant turn's text and
    its closing ``<|end|>`` (so the model learns to stop); the final eos is trained only when
    the conversation ends with an assistant turn.
    """
    ids: list[int] = [self.bos_id] if add_bos else []
    mask: list[float] = [0.0] * len(ids)
    for i, message in enumerate(messages):
      role, content = message.get('role'), message.get('content')
      if role not in self.specials.roles:
        raise ValueError(f'message {i}: role {role!r} is not one of {sorted(self.specials.roles)}')
      if not isinstance(content, str):
        raise ValueError(f'message {i}: "content" must be a string, got {type(content).__name__}')
      body = self.encode(content) + [self.specials.end_of_turn]
      trained = 1.0 if role == 'assistant' else 0.0
      ids += [self.specials.roles[role]] + body
      mask += [0.0] + [trained] * len(body)
    last_is_assistant = bool(messages) and messages[-1].get('role') == 'assistant'
    ids.append(self.eos_id)
    mask.append(1.0 if last_is_assistant else 0.0)
    return ids, mask


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes shifted past a block of reserved ids; exact round trip, no files needed.

  Layout: pad, bos, eos, unk, mask, <|system|>, <|user|>, <|assistant|>, <|end|>, then
  ``num_sentinels`` sentinels, then the 256 byte values.
  """

  def __init__(self, num_sentinels: int = 100):
    n = len(CONTROL_NAMES)
    self.offset = n + num_sentinels
    self.vocab_size = self.offset + 256
    self.ordinary_range = (self.offset, self.vocab_size)
    self.specials = SpecialIds(pad=0, bos=1, eos=2, unk=3, mask=4,
                               roles={'system': 5, 'user': 6, 'assistant': 7}, end_of_turn=8,
                               sentinels=tuple(range(n, n + num_sentinels)))

  def encode(self, text: str) -> list[int]:
    return (np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32) + self.offset).tolist()

  def decode(self, ids: Iterable[int]) -> str:
    """Bytes back to text; reserved ids are dropped and broken UTF-8 becomes U+FFFD."""
    arr = np.asarray(list(ids), np.int64)
    arr = arr[arr >= self.offset] - self.offset
    return arr.astype(np.uint8).tobytes().decode('utf-8', errors='replace')


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model with reserved ids resolved from its pieces or appended after them.

  A special already in the model as a piece (e.g. ``<extra_id_0>``, ``<mask>``) keeps its id;
  one that is missing (e.g. pad, sentinels and chat markers in Llama 2's model) gets a new id
  at ``piece_size + k``, so ``vocab_size`` may exceed the model's piece count.
  """

  def __init__(self, model: str | bytes, *, pad_id: int = -1, num_sentinels: int = 100):
    if isinstance(model, (str, os.PathLike)):
      if not os.path.exists(model):
        raise FileNotFoundError(f'SentencePiece model {model} does not exist; pass the path of '
                                'a .model file or train one with train_sentencepiece()')
      self.sp = spm.SentencePieceProcessor(model_file=str(model))
    else:
      self.sp = spm.SentencePieceProcessor(model_proto=model)
    self.piece_size = self.sp.get_piece_size()
    self._extra: list[str] = []

    def resolve(own_id: int, piece: str) -> int:
      if own_id >= 0:
        return own_id
      found = self.sp.piece_to_id(piece)
      if found != self.sp.unk_id() or piece == self.sp.id_to_piece(self.sp.unk_id()):
        return found
      self._extra.append(piece)
      return self.piece_size + len(self._extra) - 1

    self.specials = SpecialIds(
        pad=resolve(pad_id if pad_id >= 0 else self.sp.pad_id(), '<pad>'),
        bos=resolve(self.sp.bos_id(), '<s>'),
        eos=resolve(self.sp.eos_id(), '</s>'),
        unk=resolve(self.sp.unk_id(), '<unk>'),
        mask=resolve(-1, '<mask>'),
        roles={r: resolve(-1, f'<|{r}|>') for r in ROLES},
        end_of_turn=resolve(-1, '<|end|>'),
        sentinels=tuple(resolve(-1, sentinel_piece(i)) for i in range(num_sentinels)))
    self.vocab_size = self.piece_size + len(self._extra)
    self.ordinary_range = (0, self.piece_size)
    self._reserved = np.array(sorted(self.special_id_set() - {self.specials.unk}), np.int64)

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    """Pieces back to text; reserved ids (and appended ones) are dropped."""
    arr = np.asarray(list(ids), np.int64)
    arr = arr[(arr < self.piece_size) & ~np.isin(arr, self._reserved)]
    return self.sp.decode(arr.tolist())


def train_sentencepiece(texts: Iterable[str], *, vocab_size: int, model_type: str = 'bpe',
                        num_sentinels: int = 100, output_path: str | None = None,
                        **trainer_options) -> SentencePieceTokenizer:
  """Trains a SentencePiece model (``'bpe'`` or ``'unigram'``) that round-trips text exactly.

  Exactness needs the identity normalizer, kept whitespace and byte fallback (so unseen
  characters become bytes, not unk). Pad/bos/eos/unk are 0..3; mask, chat markers and sentinels
  are control symbols, so the same strings typed in text never turn into them. The model is
  written to ``output_path`` when given. ``trainer_options`` override any SentencePiece option.
  """
  if model_type not in ('bpe', 'unigram'):
    raise ValueError(f'model_type must be "bpe" or "unigram", got {model_type!r}')
  controls = ['<mask>', *(f'<|{r}|>' for r in ROLES), '<|end|>',
              *(sentinel_piece(i) for i in range(num_sentinels))]
  options = dict(
      model_type=model_type, vocab_size=vocab_size, normalization_rule_name='identity',
      remove_extra_whitespaces=False, byte_fallback=True, character_coverage=1.0,
      split_digits=True, allow_whitespace_only_pieces=True, max_sentence_length=1 << 16,
      pad_id=0, bos_id=1, eos_id=2, unk_id=3, control_symbols=controls, num_threads=1,
      minloglevel=2, hard_vocab_limit=False)
  options.update(trainer_options)
  texts = (t for t in texts if t)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=texts, model_writer=model, **options)
  if output_path:
    with open(output_path, 'wb') as f:
      f.write(model.getvalue())
  return SentencePieceTokenizer(model.getvalue(), num_sentinels=num_sentinels)


def build_tokenizer(name: str, *, pad_id: int = -1, num_sentinels: int = 100) -> Tokenizer:
  """Tokenizer from a config string: ``'byte'``, ``'sentencepiece:/path/to.model'`` or
  ``'hf:/path/to/hf_folder'``."""
  kind, _, arg = name.partition(':')
  if kind == 'byte' and not arg:
    return ByteTokenizer(num_sentinels=num_sentinels)
  if kind in ('sentencepiece', 'spm') and arg:
    return SentencePieceTokenizer(os.path.expanduser(arg), pad_id=pad_id,
                                  num_sentinels=num_sentinels)
  if kind == 'hf' and arg:   # a Hugging Face model folder (tokenizer.json or tokenizer.model)
    from data.hf_tokenizer import load_hf_tokenizer   # imports this module: load it lazily
    return load_hf_tokenizer(arg)
  raise ValueError(f'data.tokenizer={name!r} is not understood; use "byte", '
                   '"sentencepiece:/path/to/tokenizer.model" or "hf:/path/to/hf_folder"')
