"""Hugging Face folder <-> seedling parameters, tensor by tensor, straight into shardings."""

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from model import build_model, init_inputs, lora, nf4
from model.config import ModelConfig
from model.hf import safetensors_io
from model.hf.families import hf_config, model_config
from model.hf.names import resolve

MAX_SHARD_BYTES = 2 << 30   # exported safetensors files stay below this size


def read_hf_config(folder: str) -> dict:
  """config.json of a Hugging Face model folder, with a clear error when it is not one."""
  path = os.path.join(folder, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist; init_from/hf import needs a local Hugging '
                            'Face model folder (config.json + *.safetensors).')
  with open(path) as f:
    return json.load(f)


def load_config(folder: str, **overrides) -> ModelConfig:
  """The seedling ModelConfig of a Hugging Face folder; `overrides` set other fields."""
  return model_config(read_hf_config(folder), os.path.join(folder, 'config.json'), **overrides)


def abstract_params(cfg: ModelConfig) -> Any:
  """Unboxed ShapeDtypeStructs of the params of `cfg` (nothing is allocated)."""
  model = build_model(cfg)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *init_inputs(cfg))['params'])
  return nn.meta.unbox(boxed)


def _key(path) -> tuple:
  return tuple(str(getattr(k, 'key', k)) for k in path)


def _float_key(key: tuple) -> tuple:
  """The path of the float kernel an NF4 part stores (other paths unchanged)."""
  return key[:-1] + ('kernel',) if key[-1] in nf4.PARTS else key


def _float_leaves(cfg: ModelConfig) -> dict:
  """QLoRA: {path: leaf} of the unquantized model, whose float kernels the HF folder holds and
  the loader quantizes on the host, tensor by tensor; {} without NF4 kernels."""
  if not lora.quantized(cfg):
    return {}
  unquantized = abstract_params(dataclasses.replace(cfg, lora_quant=''))
  return {_key(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(unquantized)}


def _index_key(index: tuple) -> tuple:
  return tuple((s.start, s.stop) for s in index)


def _place(shape, dtype, sharding, produce) -> jax.Array:
  """A sharded array built shard by shard: `produce(index, fill)` fills each distinct host
  buffer; every device receives only its own shard."""
  by_device = sharding.addressable_devices_indices_map(shape)
  buffers = {}
  for index in by_device.values():
    k = _index_key(index)
    if k not in buffers:
      buffers[k] = (index, np.empty([len(range(*s.indices(n))) for s, n in zip(index, shape)],
                                    dtype))
  produce(list(buffers.values()))
  arrays = [jax.device_put(buffers[_index_key(i)][1], d) for d, i in by_device.items()]
  return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def load_params(folder: str, cfg: ModelConfig, shardings: Any = None,
                allow_pickle: bool = False) -> Any:
  """Parameters of `cfg` read from the Hugging Face `folder`, placed in `shardings`.

  `shardings` is a tree of NamedShardings matching the params (e.g. from
  Partitioner.abstract); None puts everything on the first device. Each HF tensor is read
  (memory-mapped) once per layer and each device receives only its shard, so host memory
  holds one parameter's shards at a time. Pickle (.bin) checkpoints load only with
  `allow_pickle=True`.
  """
  ckpt = safetensors_io.Checkpoint(folder, allow_pickle)
  names = ckpt.names()
  hf = read_hf_config(folder)
  # transformers 5 writes tie_word_embeddings=true for every T5, yet uses a saved lm_head.
  tied = ('lm_head.weight' not in names
          or hf.get('tie_word_embeddings', False) and hf.get('model_type') != 't5')
  fused = any(n.endswith('experts.gate_up_proj') for n in names)
  model_type = hf.get('model_type', '')
  # BertForMaskedLM nests the encoder under 'bert.'; BertModel folders do not.
  prefix = f'{model_type}.' if f'{model_type}.embeddings.word_embeddings.weight' in names else ''
  rule_of = lambda path: resolve(_float_key(_key(path)), cfg, tied, fused, prefix, model_type)
  abstract = abstract_params(cfg)
  floats = _float_leaves(cfg)
  float_leaf = lambda path, leaf: floats.get(_float_key(_key(path)), leaf)
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  leaves = jax.tree_util.tree_leaves_with_path(abstract)
  plans = [(_key(path), float_leaf(path, leaf), rule_of(path)) for path, leaf in leaves]
  _check(ckpt, plans, cfg, folder)

  def load_one(path, leaf, sharding):
    kind, layer, rule = rule_of(path)
    dtype = np.dtype(leaf.dtype)
    per_layer = lambda shape: shape[1:] if kind == 'scanned' else shape
    expected, stored = per_layer(float_leaf(path, leaf).shape), per_layer(leaf.shape)

    def read(i):
      arr = rule.load([ckpt.read(n) for n in rule.names(i)])
      if arr.shape != tuple(expected):
        raise ValueError(f'{folder}: tensors {rule.names(i)} give '
                         f'{"/".join(_float_key(_key(path)))} the shape {arr.shape}; expected '
                         f'{tuple(expected)}.')
      if _key(path)[-1] in nf4.PARTS:   # (codes, absmax)[this part] of the float kernel
        parts = nf4.quantize(np.asarray(arr), nf4.quantized_axis(expected, stored),
                             cfg.lora_quant_block)
        arr = parts[nf4.PARTS.index(_key(path)[-1])]
      return arr

    def produce(buffers):
      if kind == 'scanned':
        for i in range(leaf.shape[0]):
          arr = None
          for index, buf in buffers:
            start, stop, _ = index[0].indices(leaf.shape[0])
            if start <= i < stop:
              arr = read(i) if arr is None else arr
              buf[i - start] = arr[index[1:]]
      else:
        arr = read(layer)
        for index, buf in buffers:
          buf[...] = arr[index]

    return _place(leaf.shape, dtype, sharding, produce)

  params = jax.tree_util.tree_map_with_path(load_one, abstract, shardings)
  used = {n for key, leaf, (kind, layer, rule) in plans
          for i in (range(leaf.shape[0]) if kind == 'scanned' else [layer])
          for n in rule.names(i)}
  unused = sorted(names - used)
  if unused:
    logging.warning('%s: %d tensors were not used: %s', folder, len(unused),
                    ', '.join(unused[:10]))
  return params


def _check(ckpt, plans, cfg, folder) -> None:
  """Every needed tensor exists with the shape `cfg` implies; else one error listing them."""
  missing, wrong = [], []
  for key, leaf, (kind, layer, rule) in plans:
    if rule.save is None:   # fused (read-only) layout: shapes are checked after loading
      layers = range(leaf.shape[0]) if kind == 'scanned' else [layer]
      missing += [n for i in layers for n in rule.names(i) if n not in ckpt.names()]
      continue
    shape = leaf.shape[1:] if kind == 'scanned' else leaf.shape
    expected = jax.eval_shape(rule.save, jax.ShapeDtypeStruct(shape, jnp.float32))
    for i in (range(leaf.shape[0]) if kind == 'scanned' else [layer]):
      for name, exp in zip(rule.names(i), expected):
        if name not in ckpt.names():
          missing.append(name)
        elif ckpt.shape(name) != tuple(exp.shape):
          wrong.append(f'{name}: expected shape {tuple(exp.shape)} (for {"/".join(key)}), '
                       f'found {ckpt.shape(name)}')
  problems = [f'missing tensor {n}' for n in missing] + wrong
  if problems:
    raise ValueError(f'{folder} does not match the model config ({len(problems)} problems):\n  '
                     + '\n  '.join(problems[:20]) + '\nCheck that the model section matches the '
                     "folder's config.json (model.hf.load_config gives the matching config).")


ARCHITECTURE = ('family', 'vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads',
                'head_dim', 'mlp_dim', 'activation', 'norm_eps', 'rope_theta', 'rope_scaling',
                'rope_scaling_factor', 'rope_low_freq_factor', 'rope_high_freq_factor',
                'rope_original_max_len', 'tie_embeddings', 'qkv_bias', 'num_experts',
                'num_experts_per_tok', 'router_score', 'renormalize', 'norm_type', 'use_bias',
                'position_embedding', 'max_positions', 'position_offset', 'type_vocab_size',
                'embed_norm', 'norm_position', 'mlm_head', 'attention_window')
INIT_SCHEMES = {'hf': False, 'hf_pickle': True}   # init_from scheme -> allow_pickle


def init_params(init_from: str, cfg: ModelConfig, shardings: Any) -> Any:
  """Params for config key `init_from` ('hf:FOLDER', or 'hf_pickle:FOLDER' to accept .bin
  pickles), checked against `cfg` and placed in `shardings`. A LoRA model gets its base
  weights only: the folder has no adapters (the train state initialises them)."""
  scheme, _, folder = init_from.partition(':')
  if scheme not in INIT_SCHEMES or not folder:
    raise ValueError(f'init_from={init_from!r}; expected hf:/path/to/hf_folder '
                     '(or hf_pickle:/path to allow pickle .bin checkpoints).')
  folder = os.path.expanduser(folder)
  want = load_config(folder)
  diffs = [f'model.{k}={getattr(cfg, k)!r} but {folder} has {getattr(want, k)!r}'
           for k in ARCHITECTURE if getattr(cfg, k) != getattr(want, k)]
  if diffs:
    raise ValueError('init_from: the model section does not match the checkpoint:\n  ' +
                     '\n  '.join(diffs) + '\nSet those model keys (e.g. --config.model.KEY=VALUE).')
  return load_params(folder, lora.base_config(cfg), lora.split_adapters(shardings)[1],
                     allow_pickle=INIT_SCHEMES[scheme])


def export(folder: str, cfg: ModelConfig, params: Any, dtype: str = 'float32') -> None:
  """Writes `params` of a decoder (dense or Mixtral-style MoE), T5 or BERT/RoBERTa encoder as
  a Hugging Face folder: config.json and safetensors shards (+ index) that transformers loads
  unchanged. LoRA adapters are merged into their kernels first (model/lora.py)."""
  params, cfg = lora.merge_lora(params, cfg)
  config = hf_config(cfg, dtype)   # an unsupported model fails before anything is written
  kind = config['model_type']
  # an encoder with its MLM head nests under 'bert.' / 'roberta.', as ...ForMaskedLM saves it
  prefix = f'{kind}.' if cfg.family == 'encoder' and cfg.mlm_head else ''
  os.makedirs(folder, exist_ok=True)
  np_dtype = np.dtype(jnp.dtype(dtype))
  shards, current, size = [], {}, 0

  def add(name, arr):
    nonlocal current, size
    current[name] = np.asarray(arr).astype(np_dtype)
    size += current[name].nbytes
    if size >= MAX_SHARD_BYTES:
      shards.append(current)
      current, size = {}, 0

  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    stacking, layer, rule = resolve(_key(path), cfg, prefix=prefix, model_type=kind)
    if stacking == 'scanned':
      for i in range(leaf.shape[0]):
        for name, arr in zip(rule.names(i), rule.save(np.asarray(leaf[i]))):
          add(name, arr)
    else:
      for name, arr in zip(rule.names(layer), rule.save(np.asarray(leaf))):
        add(name, arr)
  if current or not shards:
    shards.append(current)
  weight_map = {}
  for k, tensors in enumerate(shards):
    file = ('model.safetensors' if len(shards) == 1
            else f'model-{k + 1:05d}-of-{len(shards):05d}.safetensors')
    safetensors_io.write(os.path.join(folder, file), tensors, {'format': 'pt'})
    weight_map.update({n: file for n in tensors})
  if len(shards) > 1:
    total = sum(a.nbytes for t in shards for a in t.values())
    with open(os.path.join(folder, safetensors_io.INDEX), 'w') as f:
      json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2)
