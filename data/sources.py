"""Sources as TFDS datasets: user files become array_record datasets read with tfds.data_source.

A source is named by a string (``config.data.source``):

- ``synthetic``: the embedded problems of data/synthetic.py (generated on the fly, no files).
- ``text:PATH``: a .txt file or a folder of them, one document per file or per line
  (``data.text_unit``); .json/.jsonl files take their documents from ``data.text_field``
  (a string, or a list of strings joined by newlines).
- ``sft_jsonl:PATH``: JSONL (or a JSON array) of ``{"prompt", "response"}``,
  ``{"messages": [{"role", "content"}, ...]}`` or Alpaca's ``{"instruction", "input", "output"}``.
- ``preference_jsonl:PATH``: ``{"prompt", "chosen", "rejected"}``, or hh-rlhf's
  ``{"chosen", "rejected"}`` dialogues whose prompt is the shared prefix up to the last
  ``\\n\\nAssistant:``.
- ``gsm8k:PATH``: ``{"question", "answer"}`` whose answer ends in ``#### <number>``.
- ``tfds:NAME[/CONFIG][:VERSION]``: any TFDS dataset prepared as array_record in ``data.data_dir``.

File sources are prepared once into ``data.data_dir`` under a config named by a fingerprint of
the files (path, size, mtime) and the parsing options, and reused until a file changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from data import synthetic

KINDS = ('synthetic', 'text', 'sft_jsonl', 'preference_jsonl', 'gsm8k', 'tfds')
BAD_LINE_POLICIES = ('error', 'skip')
HELD_OUT = ('eval', 'test', 'validation')   # split names that mean the held-out split
HH_ASSISTANT = '\n\nAssistant:'


class BadRecord(ValueError):
  """A record that cannot be parsed; the message says file:line and why."""


@dataclasses.dataclass
class FileSourceConfig(tfds.core.BuilderConfig):
  """Where a file source comes from and how it is parsed."""
  path: str = ''
  bad_lines: str = 'error'       # error | skip
  text_unit: str = 'file'        # text sources: file | line
  text_field: str = 'text'       # text sources reading .json/.jsonl files


def _files(path: Path, suffixes: tuple[str, ...] | None = None) -> list[Path]:
  if not path.exists():
    raise FileNotFoundError(f'data source path {path} does not exist')
  if path.is_file():
    return [path]
  files = sorted(p for p in path.rglob('*') if p.is_file() and not p.name.startswith('.')
                 and (suffixes is None or p.suffix in suffixes))
  if not files:
    raise ValueError(f'data source folder {path} holds no '
                     f'{"/".join(suffixes) if suffixes else ""} files')
  return files


def fingerprint(cfg: FileSourceConfig, kind: str) -> str:
  """Config name for a prepared file source: changes whenever a file or an option does."""
  h = hashlib.sha256(f'{kind}|{cfg.bad_lines}|{cfg.text_unit}|{cfg.text_field}'.encode())
  for f in _files(Path(cfg.path)):
    st = f.stat()
    h.update(f'|{f.resolve()}|{st.st_size}|{st.st_mtime_ns}'.encode())
  return f'{kind}_{h.hexdigest()[:20]}'


class _Reader:
  """Yields (where, object) from JSON files, applying the bad-line policy and counting skips."""

  def __init__(self, policy: str):
    if policy not in BAD_LINE_POLICIES:
      raise ValueError(f'data.bad_lines={policy!r}; use one of {BAD_LINE_POLICIES}')
    self.policy = policy
    self.skipped = 0
    self.reasons: list[str] = []

  def bad(self, where: str, reason: str) -> None:
    msg = f'{where}: {reason}'
    if self.policy == 'error':
      raise BadRecord(f'{msg} (set data.bad_lines="skip" to skip and count such records)')
    self.skipped += 1
    if len(self.reasons) < 20:
      self.reasons.append(msg)
    logging.warning('skipping bad record %s', msg)

  def json_objects(self, path: Path) -> Iterator[tuple[str, Any]]:
    """Objects of a JSONL file (one per non-blank line) or of a JSON array file."""
    with open(path, encoding='utf-8') as f:
      head = f.read(1 << 12).lstrip()
    if head.startswith('['):
      try:
        with open(path, encoding='utf-8') as f:
          items = json.load(f)
      except json.JSONDecodeError as e:
        raise BadRecord(f'{path}:{e.lineno}: invalid JSON array ({e.msg}); fix the file or '
                        'convert it to JSONL, where bad lines can be skipped') from e
      for i, obj in enumerate(items):
        yield f'{path} record {i}', obj
      return
    with open(path, encoding='utf-8') as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          yield f'{path}:{lineno}', json.loads(line)
        except json.JSONDecodeError as e:
          self.bad(f'{path}:{lineno}', f'malformed JSON ({e.msg} at column {e.colno})')


def _field(obj: Any, name: str, where: str) -> str:
  if not isinstance(obj, dict):
    raise KeyError(f'{where}: expected a JSON object, got {type(obj).__name__}')
  if name not in obj:
    raise KeyError(f'{where}: missing field "{name}" (fields present: {sorted(obj)})')
  value = obj[name]
  if not isinstance(value, str):
    raise KeyError(f'{where}: field "{name}" must be a string, got {type(value).__name__}')
  return value


class _FileBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared plumbing: one 'train' split of string features parsed from the configured path."""

  VERSION = tfds.core.Version('1.0.0')
  # There is nothing to download, so no checksums file: without this TFDS looks for one next
  # to this module through a lazy `importlib_resources` import that is absent on Python >= 3.9.
  code_path = None
  FIELDS: tuple[str, ...] = ()
  SUFFIXES: tuple[str, ...] | None = ('.jsonl', '.json')

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({k: tfds.features.Text() for k in self.FIELDS})
    return tfds.core.DatasetInfo(builder=self, features=features,
                                 metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    cfg = self.builder_config
    reader = _Reader(cfg.bad_lines)
    count = 0
    for path in _files(Path(cfg.path), self.SUFFIXES):
      for key, record in self._records(path, reader):
        count += 1
        yield key, record
    if count == 0:
      raise ValueError(f'data source {cfg.path} produced no records'
                       + (f' ({reader.skipped} bad records skipped)' if reader.skipped else ''))
    self.info.metadata['skipped'] = reader.skipped
    self.info.metadata['skip_reasons'] = reader.reasons

  def _records(self, path: Path, reader: _Reader) -> Iterator[tuple[str, dict]]:
    for where, obj in reader.json_objects(path):
      try:
        record = self._parse(obj, where)
      except (KeyError, ValueError) as e:
        reader.bad(where, str(e.args[0]).removeprefix(f'{where}: '))
        continue
      yield where, record

  def _parse(self, obj: Any, where: str) -> dict:
    raise NotImplementedError


class SeedlingText(_FileBuilder):
  """Plain text: one document per file or per line; JSON records via ``text_field``."""

  FIELDS = ('text',)
  SUFFIXES = None

  def _records(self, path: Path, reader: _Reader) -> Iterator[tuple[str, dict]]:
    cfg = self.builder_config
    if path.suffix in ('.json', '.jsonl'):
      for where, obj in reader.json_objects(path):
        items = obj if isinstance(obj, list) else [obj]
        for j, item in enumerate(items):
          try:
            text = _text_of(item, cfg.text_field, where)
          except KeyError as e:
            reader.bad(f'{where}[{j}]', str(e.args[0]).removeprefix(f'{where}: '))
            continue
          if text:
            yield f'{where}[{j}]', {'text': text}
      return
    try:
      content = path.read_text(encoding='utf-8')
    except UnicodeDecodeError as e:
      reader.bad(str(path), f'not UTF-8 text ({e.reason} at byte {e.start})')
      return
    if cfg.text_unit == 'line':
      for lineno, line in enumerate(content.splitlines(), 1):
        if line.strip():
          yield f'{path}:{lineno}', {'text': line}
    elif cfg.text_unit == 'file':
      if content:
        yield str(path), {'text': content}
    else:
      raise ValueError(f'data.text_unit={cfg.text_unit!r}; use "file" or "line"')


def _text_of(obj: Any, name: str, where: str) -> str:
  if isinstance(obj, dict) and isinstance(obj.get(name), list) and all(
      isinstance(x, str) for x in obj[name]):
    return '\n'.join(obj[name])
  return _field(obj, name, where)


class SeedlingSft(_FileBuilder):
  """SFT pairs or chats; stored as prompt/response plus the chat as JSON (empty when absent)."""

  FIELDS = ('prompt', 'response', 'messages')

  def _parse(self, obj: Any, where: str) -> dict:
    if isinstance(obj, dict) and 'messages' in obj:
      messages = obj['messages']
      if not isinstance(messages, list) or not messages:
        raise KeyError(f'{where}: "messages" must be a non-empty list')
      for i, m in enumerate(messages):
        _field(m, 'role', f'{where} message {i}')
        _field(m, 'content', f'{where} message {i}')
        if m['role'] not in ('system', 'user', 'assistant'):
          raise KeyError(f'{where}: message {i} has role {m["role"]!r}; use system, user or '
                         'assistant')
      if not any(m['role'] == 'assistant' for m in messages):
        raise KeyError(f'{where}: the chat has no assistant turn to train on')
      clean = [{'role': m['role'], 'content': m['content']} for m in messages]
      return {'prompt': '', 'response': '', 'messages': json.dumps(clean, ensure_ascii=False)}
    if isinstance(obj, dict) and 'instruction' in obj:
      prompt = _field(obj, 'instruction', where)
      extra = obj.get('input') or ''
      if extra:
        prompt = f'{prompt}\n\n{extra}'
      return {'prompt': prompt, 'response': _field(obj, 'output', where), 'messages': ''}
    return {'prompt': _field(obj, 'prompt', where), 'response': _field(obj, 'response', where),
            'messages': ''}


def split_hh_dialogue(chosen: str, rejected: str, where: str) -> dict:
  """hh-rlhf form: the prompt is the shared prefix up to and including the last Assistant tag."""
  cut = chosen.rfind(HH_ASSISTANT)
  if cut < 0:
    raise KeyError(f'{where}: "chosen" has no "\\n\\nAssistant:" turn')
  prompt = chosen[:cut + len(HH_ASSISTANT)]
  if not rejected.startswith(prompt):
    raise KeyError(f'{where}: "chosen" and "rejected" do not share the prompt up to the last '
                   '"\\n\\nAssistant:"')
  return {'prompt': prompt, 'chosen': chosen[len(prompt):], 'rejected': rejected[len(prompt):]}


class SeedlingPreference(_FileBuilder):
  """Preference pairs; hh-rlhf dialogues are split into shared prompt and two responses."""

  FIELDS = ('prompt', 'chosen', 'rejected')

  def _parse(self, obj: Any, where: str) -> dict:
    chosen, rejected = _field(obj, 'chosen', where), _field(obj, 'rejected', where)
    if 'prompt' in obj:
      return {'prompt': _field(obj, 'prompt', where), 'chosen': chosen, 'rejected': rejected}
    return split_hh_dialogue(chosen, rejected, where)


class SeedlingGsm8k(_FileBuilder):
  """Question/answer problems whose answer ends in ``#### <number>``."""

  FIELDS = ('question', 'answer', 'final_answer')

  def _parse(self, obj: Any, where: str) -> dict:
    question, answer = _field(obj, 'question', where), _field(obj, 'answer', where)
    if '####' not in answer:
      raise KeyError(f'{where}: "answer" has no final "#### <number>" line')
    final = synthetic.extract_answer(answer)
    if final is None:
      raise KeyError(f'{where}: no number after "####" in "answer"')
    return {'question': question, 'answer': answer, 'final_answer': final}


BUILDERS = {'text': SeedlingText, 'sft_jsonl': SeedlingSft,
            'preference_jsonl': SeedlingPreference, 'gsm8k': SeedlingGsm8k}


@contextlib.contextmanager
def _lock(path: Path):
  """An exclusive file lock, so hosts sharing a data_dir prepare a dataset once."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def prepare(kind: str, path: str, data_dir: str, *, bad_lines: str = 'error',
            text_unit: str = 'file', text_field: str = 'text') -> tfds.core.DatasetBuilder:
  """Prepares (once) and returns the TFDS builder of a file source."""
  if kind not in BUILDERS:
    raise ValueError(f'file source kind {kind!r}; use one of {sorted(BUILDERS)}')
  path = os.path.abspath(os.path.expanduser(path))
  cfg = FileSourceConfig(name='pending', path=path, bad_lines=bad_lines, text_unit=text_unit,
                         text_field=text_field)
  cfg = dataclasses.replace(cfg, name=fingerprint(cfg, kind))
  data_dir = os.path.expanduser(data_dir)
  builder = BUILDERS[kind](config=cfg, data_dir=data_dir, file_format='array_record')
  with _lock(Path(data_dir) / f'{builder.name}.{cfg.name}.lock'):
    builder.download_and_prepare()
  return builder


@dataclasses.dataclass
class Source:
  """Random-access records of one split plus what preparing them reported."""
  records: Any                  # len() and __getitem__ -> dict
  name: str
  skipped: int = 0
  skip_reasons: tuple[str, ...] = ()


def open_source(spec: str, split: str, *, data_dir: str, bad_lines: str = 'error',
                text_unit: str = 'file', text_field: str = 'text', eval_fraction: float = 0.0,
                eval_split: str = '', synthetic_options: dict | None = None) -> Source:
  """Opens ``spec`` (see the module docstring) for ``split``.

  ``split`` is ``'train'``, a held-out name (``'eval'``, ``'test'``, ``'validation'``: the
  synthetic test split; a TFDS dataset's split of that name, else ``eval_split``, else its
  validation or test split; the last ``eval_fraction`` of a file source, whose train split is
  then the rest) or any TFDS split string such as ``'train[:10%]'``.
  """
  kind, _, arg = spec.partition(':')
  if kind not in KINDS:
    raise ValueError(f'data.source={spec!r}: unknown kind {kind!r}; use one of {KINDS}')
  held_out = split in HELD_OUT
  if kind == 'synthetic':
    return Source(synthetic.SyntheticProblems('test' if held_out else split,
                                              **(synthetic_options or {})), spec)
  if not arg:
    raise ValueError(f'data.source={spec!r} needs a path or name after "{kind}:"')
  if kind == 'tfds':
    name, _, version = arg.partition(':')
    builder = tfds.builder(f'{name}:{version}' if version else name,
                           data_dir=os.path.expanduser(data_dir))
    if not builder.is_prepared():
      raise FileNotFoundError(
          f'tfds dataset {arg} is not prepared in {builder.data_dir}; prepare it there as '
          'array_record (e.g. `tfds build NAME --file_format=array_record --data_dir=DIR`) '
          'and set data.data_dir to DIR')
    if held_out and split not in builder.info.splits:
      split = eval_split or next((s for s in ('validation', 'test') if s in builder.info.splits),
                                 '')
      if not split:
        raise ValueError(f'tfds dataset {name} has no validation/test split; set '
                         'data.eval_split')
    return Source(builder.as_data_source(split=split), spec)
  builder = prepare(kind, arg, data_dir, bad_lines=bad_lines, text_unit=text_unit,
                    text_field=text_field)
  if (split == 'train' or held_out) and eval_fraction > 0:
    cut = round(100 * (1 - eval_fraction))
    split = f'train[{cut}%:]' if held_out else f'train[:{cut}%]'
  elif held_out:
    raise ValueError(f'data.source={spec!r} has no {split!r} split; set data.eval_fraction > 0 '
                     'to hold out the end of it')
  meta = builder.info.metadata
  return Source(builder.as_data_source(split=split), spec, int(meta.get('skipped', 0)),
                tuple(meta.get('skip_reasons', ())))
