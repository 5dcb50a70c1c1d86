"""Llama / Mistral / Qwen2 / Mixtral: import equals transformers, export round-trips, errors."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

import model.hf as hf
from model import build_model
from model.hf import safetensors_io
from tests.hf.conftest import FAMILIES
from tests.helpers import partitioner

TOKENS = np.random.RandomState(0).randint(0, 64, (2, 8))
MASK = np.array([[1] * 8, [1] * 5 + [0] * 3])   # second row right-padded


def torch_logits(model, tokens=TOKENS, mask=MASK):
  import torch
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask))
  return out.logits.numpy()


def our_logits(cfg, params, tokens=TOKENS, mask=MASK):
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  return np.asarray(build_model(cfg).apply({'params': params}, tokens, positions, mask))


@pytest.mark.parametrize('family', FAMILIES)
def test_import_matches_export_roundtrips(hf_models, transformers, family, tmp_path):
  folder, model = hf_models[family]
  cfg = hf.load_config(folder)
  params = hf.load_params(folder, cfg)
  want = torch_logits(model)
  real = MASK.astype(bool)
  np.testing.assert_allclose(our_logits(cfg, params)[real], want[real], atol=1e-4, rtol=1e-4)

  out = str(tmp_path / 'export')
  hf.export(out, cfg, params)
  again = hf.load_params(out, hf.load_config(out))
  jax.tree.map(np.testing.assert_array_equal, again, params)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
  np.testing.assert_allclose(torch_logits(reloaded)[real], want[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('family', ['qwen2', 'mixtral'])
def test_sharded_import_equals_single_device(hf_models, family):
  folder, _ = hf_models[family]
  cfg = hf.load_config(folder)
  part = partitioner(data=2, fsdp=2, tensor=2) if family == 'qwen2' else partitioner(
      fsdp=2, expert=4)
  ids = np.zeros((1, 8), np.int32)
  _, shardings = part.abstract(lambda r: build_model(cfg).init(r, ids, ids, ids + 1)['params'],
                               jax.random.key(0))
  sharded = hf.load_params(folder, cfg, shardings)
  single = hf.load_params(folder, cfg)
  for a, s in zip(jax.tree.leaves(sharded), jax.tree.leaves(shardings)):
    assert a.sharding == s
  assert any(len(a.sharding.device_set) == 8 and not a.sharding.is_fully_replicated
             for a in jax.tree.leaves(sharded))
  jax.tree.map(np.testing.assert_array_equal, sharded, single)


def _copy(folder, tmp_path):
  out = tmp_path / 'copy'
  shutil.copytree(folder, out)
  return str(out)


def test_unknown_architecture(hf_models, tmp_path):
  folder = _copy(hf_models['llama'][0], tmp_path)
  with open(os.path.join(folder, 'config.json')) as f:
    config = json.load(f)
  config['model_type'] = 'gpt2'
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(config, f)
  with pytest.raises(ValueError, match="model_type='gpt2' is not supported.*llama"):
    hf.load_config(folder)


def test_missing_tensor_and_shape_mismatch(hf_models, tmp_path):
  folder = _copy(hf_models['llama'][0], tmp_path)
  path = os.path.join(folder, 'model.safetensors')
  ckpt = safetensors_io.Checkpoint(folder)
  tensors = {n: np.array(ckpt.read(n)) for n in ckpt.names()}
  del tensors['model.layers.1.mlp.up_proj.weight']
  tensors['model.norm.weight'] = np.ones(31, np.float32)
  safetensors_io.write(path, tensors)
  cfg = hf.load_config(folder)
  with pytest.raises(ValueError) as err:
    hf.load_params(folder, cfg)
  assert 'missing tensor model.layers.1.mlp.up_proj.weight' in str(err.value)
  assert 'model.norm.weight: expected shape (32,) (for final_norm/scale), found (31,)' in str(
      err.value)


def test_pickle_refused_without_flag(hf_models, tmp_path, transformers):
  import torch
  folder = _copy(hf_models['llama'][0], tmp_path)
  os.remove(os.path.join(folder, 'model.safetensors'))
  torch.save(hf_models['llama'][1].state_dict(), os.path.join(folder, 'pytorch_model.bin'))
  cfg = hf.load_config(folder)
  with pytest.raises(ValueError, match='pickle.*allow_pickle=True'):
    hf.load_params(folder, cfg)
  params = hf.load_params(folder, cfg, allow_pickle=True)
  jax.tree.map(np.testing.assert_array_equal, params,
               hf.load_params(hf_models['llama'][0], cfg))


def test_unsupported_rope_scaling():
  with pytest.raises(ValueError, match="RoPE scaling 'yarn' is not supported"):
    hf.families.model_config(dict(model_type='llama', rope_scaling={'rope_type': 'yarn'},
                                  vocab_size=8, hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=1, intermediate_size=8, rms_norm_eps=1e-6))


def test_sliding_window_imports_and_exports_only_where_huggingface_has_it(hf_models):
  assert hf.load_config(hf_models['mistral'][0]).attention_window == 3
  assert hf.load_config(hf_models['mixtral'][0]).attention_window == 5
  assert hf.load_config(hf_models['llama'][0]).attention_window == 0
  qwen = hf.load_config(hf_models['qwen2'][0])
  with pytest.raises(ValueError, match='needs the Mistral or Mixtral layout'):
    hf.families.hf_config(dataclasses.replace(qwen, attention_window=4))


def test_train_init_from(hf_models, tmp_path, monkeypatch):
  import flax.linen as nn
  from train.sharding import Partitioner
  from train.trainer import Experiment, train
  from tests.helpers import tiny_config
  folder, _ = hf_models['qwen2']
  cfg = hf.load_config(folder)
  config = tiny_config(**{k: getattr(cfg, k) for k in hf.convert.ARCHITECTURE})
  config.update(init_from=f'hf:{folder}')
  config.train.steps = 0
  config.mesh.update(data=2, fsdp=2, tensor=2)
  # The state is built around the loaded params: no random init runs, nor is one compiled.
  exp = Experiment.from_config(config)
  abstract, shardings = exp.partitioner.abstract(exp.init_state, jax.random.key(0))
  lowered = exp.jit_state_from_params(shardings).lower(abstract.params, jax.random.key(0))
  random_init = exp.partitioner.jit(lambda r: nn.meta.unbox(exp.init_state(r)))
  assert 'threefry' in random_init.lower(jax.random.key(0)).as_text()
  assert 'threefry' not in lowered.as_text()
  memory = lowered.compile().memory_analysis()   # per device: params in, params + moments out
  assert memory.alias_size_in_bytes == memory.argument_size_in_bytes   # params donated
  monkeypatch.setattr(Partitioner, 'init', lambda *a: pytest.fail('random init ran'))
  state = train(config, str(tmp_path / 'run'))
  jax.tree.map(np.testing.assert_array_equal, state.params, hf.load_params(folder, cfg))
  assert all(not np.any(x) for x in jax.tree.leaves(state.opt_state) if x.ndim)   # zero moments

  config.model.num_layers = 3
  with pytest.raises(ValueError, match='model.num_layers=3 but .* has 2'):
    train(config, str(tmp_path / 'run2'))


@pytest.mark.parametrize('family,targets,quant', [
    ('llama', 'query,key,value,out,wi_0,wi_1,wo', ''), ('mixtral', 'query,key,value,out', ''),
    ('mistral', 'query,value,wo', 'nf4')])
def test_lora_init_from_then_merged_export(hf_models, transformers, family, targets, quant,
                                           tmp_path):
  """QLoRA ('nf4') loads the folder's kernels quantized; the export merges its adapters into
  the dequantized kernels."""
  from model import lora, nf4
  from model.param_tree import combine
  from tests.helpers import tiny_config
  from train.trainer import train
  folder, model = hf_models[family]
  cfg = hf.load_config(folder)
  quantization = dict(lora_quant=quant, lora_quant_block=8)
  lora_cfg = dataclasses.replace(cfg, lora_rank=4, lora_targets=targets, **quantization)
  config = tiny_config(**{k: getattr(cfg, k) for k in hf.convert.ARCHITECTURE},
                       lora_rank=4, lora_targets=targets, **quantization)
  config.update(init_from=f'hf:{folder}')
  config.train.steps = 0
  config.mesh.update(data=2, fsdp=2, tensor=2)
  state = train(config, str(tmp_path / 'run'))
  base = hf.load_params(folder, lora.base_config(lora_cfg))   # the folder's weights, frozen
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen), base)
  if quant:   # stored as NF4 of the folder's float kernels
    query = hf.load_params(folder, cfg)['layers']['attn']['query']['kernel'][0]
    want = nf4.quantize(np.asarray(query), 0, 8)
    np.testing.assert_array_equal(base['layers']['attn']['query']['kernel_nf4'][0], want[0])
    np.testing.assert_array_equal(base['layers']['attn']['query']['kernel_absmax'][0], want[1])
  fresh = jax.device_get(state.params)   # fresh adapters: random A, zero B
  assert all(np.any(a['lora_a']) and not np.any(a['lora_b'])
             for a in jax.tree.leaves(fresh, is_leaf=lambda x: 'lora_a' in x))

  rng = np.random.RandomState(0)
  adapters = jax.tree.map(lambda x: rng.normal(0, 0.1, x.shape).astype(x.dtype), fresh)
  params = combine(base, adapters)
  ours = our_logits(lora_cfg, params)
  real = MASK.astype(bool)
  assert np.abs(ours - torch_logits(model))[real].max() > 1e-2   # the adapters matter
  out = str(tmp_path / 'export')
  hf.export(out, lora_cfg, params)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
  np.testing.assert_allclose(torch_logits(reloaded)[real], ours[real], atol=1e-4, rtol=1e-4)
