"""Load a Hugging Face decoder folder and generate: the notebook one-liner and a CLI.

  from experiments.generate import HFModel
  print(HFModel.load('/path/to/Qwen2.5-0.5B').complete('The capital of France is', 20))

  python -m experiments.generate --hf=/path/to/folder --prompt='Hello' --max_new_tokens=20

Greedy decoding recomputes the whole (fixed-length) window each step: one compile, simple and
exact, quadratic in length. It is meant for checks and demos, not serving.
"""

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from data.hf_tokenizer import load_hf_tokenizer
from model import build_model
from model.config import ModelConfig
from model.hf import load_config, load_params
from train.sharding import Partitioner, make_mesh


def greedy(model, params, prompt: jax.Array, lengths: jax.Array, steps: int) -> jax.Array:
  """Extends each row of `prompt` [B, L] (left-aligned, `lengths` real tokens, L >= max
  length + steps) by `steps` argmax tokens; returns the new tokens [B, steps]."""
  rows, window = prompt.shape
  positions = jnp.broadcast_to(jnp.arange(window), prompt.shape)

  def body(i, tokens):
    at = lengths + i                                      # where this step writes, per row
    segments = (positions < at[:, None]).astype(jnp.int32)
    logits = model.apply({'params': params}, tokens, positions, segments)
    last = jnp.take_along_axis(logits, (at - 1)[:, None, None], axis=1)[:, 0]
    return tokens.at[jnp.arange(rows), at].set(jnp.argmax(last, -1).astype(tokens.dtype))

  tokens = jax.lax.fori_loop(0, steps, body, prompt)
  return jax.vmap(lambda row, n: jax.lax.dynamic_slice(row, (n,), (steps,)))(tokens, lengths)


@dataclasses.dataclass
class HFModel:
  """A Hugging Face decoder loaded into seedling: config, sharded params, tokenizer."""
  cfg: ModelConfig
  params: Any
  tokenizer: Any
  partitioner: Partitioner

  @classmethod
  def load(cls, folder: str, mesh: Optional[dict] = None, **overrides) -> 'HFModel':
    """Reads `folder` onto `mesh` (mesh axis sizes, default all devices on 'fsdp'); `overrides`
    set ModelConfig fields (e.g. dtype='bfloat16')."""
    cfg = load_config(folder, **overrides)
    shape = {'data': 1, 'fsdp': -1, 'tensor': 1, 'expert': 1, **(mesh or {})}
    partitioner = Partitioner(make_mesh(shape))
    model = build_model(cfg)
    ids = jnp.zeros((1, 1), jnp.int32)
    _, shardings = partitioner.abstract(
        lambda r: model.init(r, ids, ids, ids + 1)['params'], jax.random.key(0))
    return cls(cfg, load_params(folder, cfg, shardings), load_hf_tokenizer(folder), partitioner)

  def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of token-id prompts, each cut after the tokenizer's eos."""
    window = max(len(p) for p in prompts) + max_new_tokens
    batch = np.full((len(prompts), window), self.tokenizer.pad_id, np.int32)
    for row, p in zip(batch, prompts):
      row[:len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    model = build_model(self.cfg)
    run = self.partitioner.jit(lambda p, b, n: greedy(model, p, b, n, max_new_tokens))
    out = np.asarray(run(self.params, batch, lengths))
    eos = self.tokenizer.eos_id
    return [row[:list(row).index(eos) + 1] if eos in row else list(row) for row in out.tolist()]

  def complete(self, prompt: str, max_new_tokens: int = 32) -> str:
    """Greedy text continuation of `prompt` (bos first when the tokenizer has one)."""
    bos = self.tokenizer.bos_id
    ids = ([bos] if bos >= 0 else []) + self.tokenizer.encode(prompt)
    return self.tokenizer.decode(self.generate_ids([ids], max_new_tokens)[0])


_HF = flags.DEFINE_string('hf', None, 'Hugging Face model folder (config.json, safetensors, '
                          'tokenizer files).')
_PROMPT = flags.DEFINE_string('prompt', '', 'Text to continue.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 32, 'Tokens to generate.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not _HF.value:
    raise app.UsageError('--hf=/path/to/hf_folder is required.')
  print(HFModel.load(_HF.value).complete(_PROMPT.value, _MAX_NEW.value))


if __name__ == '__main__':
  app.run(main)
