"""Load a Hugging Face decoder folder and generate: the notebook one-liner and a CLI.

  from experiments.generate import HFModel
  print(HFModel.load('/path/to/Qwen2.5-0.5B').complete('The capital of France is', 20))

  python -m experiments.generate --hf=/path/to/folder --prompt='Hello' --max_new_tokens=20

Generation decodes from the KV cache (model.decoding.decoder_generate) in one function jitted
by the Partitioner: the left-padded prompts are prefilled once, then one token per step,
greedy or sampled.
"""

import dataclasses
from typing import Any, Optional, Sequence

import jax
import numpy as np
from absl import app, flags

from data.hf_tokenizer import load_hf_tokenizer
from model import build_model
from model.config import ModelConfig
from model.decoding import decoder_generate
from model.hf import load_config, load_params
from train.sharding import Partitioner, make_mesh


# Prompt widths are rounded up to a multiple of this, so prompts of similar lengths share one
# compiled generation program instead of compiling one per length.
PROMPT_BUCKET = 64


def left_pad(prompts: Sequence[Sequence[int]],
             multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """(batch [B, W] with each prompt at the end of its row, lengths [B]); W is the longest
  prompt's length rounded up to a multiple of `multiple`.

  Padding is id 0: any in-vocabulary id works, as padding slots are masked out."""
  if not prompts or not all(len(p) for p in prompts):
    raise ValueError('generate: every prompt needs at least one token (e.g. the bos id).')
  lengths = np.array([len(p) for p in prompts], np.int32)
  width = -(-lengths.max() // multiple) * multiple
  batch = np.zeros((len(prompts), width), np.int32)
  for row, p in zip(batch, prompts):
    row[len(row) - len(p):] = p
  return batch, lengths


@dataclasses.dataclass
class HFModel:
  """A Hugging Face decoder loaded into seedling: config, sharded params, tokenizer."""
  cfg: ModelConfig
  params: Any
  tokenizer: Any
  partitioner: Partitioner
  # (max_new_tokens, temperature) -> jitted generation: reused, so a call with prompts of the
  # same batch size and bucketed width runs without compiling.
  _generators: dict = dataclasses.field(default_factory=dict, init=False, repr=False,
                                        compare=False)

  @classmethod
  def load(cls, folder: str, mesh: Optional[dict] = None, **overrides) -> 'HFModel':
    """Reads `folder` onto `mesh` (mesh axis sizes, default all devices on 'fsdp'); `overrides`
    set ModelConfig fields (e.g. dtype='bfloat16')."""
    cfg = load_config(folder, **overrides)
    shape = {'data': 1, 'fsdp': -1, 'tensor': 1, 'expert': 1, **(mesh or {})}
    partitioner = Partitioner(make_mesh(shape))
    model = build_model(cfg)
    ids = np.zeros((1, 1), np.int32)
    _, shardings = partitioner.abstract(
        lambda r: model.init(r, ids, ids, ids + 1)['params'], jax.random.key(0))
    return cls(cfg, load_params(folder, cfg, shardings), load_hf_tokenizer(folder), partitioner)

  def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   temperature: float = 0.0, seed: int = 0) -> list[list[int]]:
    """Continuations of token-id prompts (greedy at temperature 0, else sampled with `seed`),
    each cut after the tokenizer's eos."""
    batch, lengths = left_pad(prompts, PROMPT_BUCKET)
    key, eos = (max_new_tokens, temperature), self.tokenizer.eos_id
    if key not in self._generators:
      model = build_model(self.cfg)
      self._generators[key] = self.partitioner.jit(lambda p, b, n, r: decoder_generate(
          model, p, b, n, r, steps=max_new_tokens, temperature=temperature, eos_id=eos)[0])
    out = np.asarray(self._generators[key](self.params, batch, lengths, jax.random.key(seed)))
    return [row[:row.index(eos) + 1] if eos in row else row for row in out.tolist()]

  def complete(self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0) -> str:
    """Text continuation of `prompt` (bos first when the tokenizer has one)."""
    bos = self.tokenizer.bos_id
    ids = ([bos] if bos >= 0 else []) + self.tokenizer.encode(prompt)
    return self.tokenizer.decode(self.generate_ids([ids], max_new_tokens, temperature)[0])


_HF = flags.DEFINE_string('hf', None, 'Hugging Face model folder (config.json, safetensors, '
                          'tokenizer files).')
_PROMPT = flags.DEFINE_string('prompt', '', 'Text to continue.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 32, 'Tokens to generate.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, 'Sampling temperature; 0 = greedy.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not _HF.value:
    raise app.UsageError('--hf=/path/to/hf_folder is required.')
  print(HFModel.load(_HF.value).complete(_PROMPT.value, _MAX_NEW.value, _TEMPERATURE.value))


if __name__ == '__main__':
  app.run(main)
