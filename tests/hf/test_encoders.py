"""BERT / RoBERTa: hidden states and MLM logits equal transformers' (padded batch, token types,
RoBERTa's offset positions), export round-trips through transformers, sharded import equals
single-device, errors name the tensor."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

import model.hf as hf
from model import build_model
from model.config import ModelConfig
from model.hf import safetensors_io
from tests.helpers import partitioner

FAMILIES = ('bert', 'roberta')
COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=48, max_position_embeddings=24,
              initializer_range=0.3)   # large weights: tanh-GELU would be off by > 1e-4
EXTRA = {'bert': dict(type_vocab_size=2), 'roberta': dict(type_vocab_size=1)}
TOKENS = np.random.RandomState(0).randint(3, 96, (2, 10))
MASK = np.array([[1] * 10, [1] * 6 + [0] * 4])   # second row right-padded
TYPES = {'bert': np.array([[0] * 5 + [1] * 5, [0] * 3 + [1] * 3 + [0] * 4]),   # sentence A, B
         'roberta': np.zeros((2, 10), np.int64)}


@pytest.fixture(scope='module')
def encoders(transformers, tmp_path_factory):
  """family -> (MLM folder, base-model folder, tokens, torch (hidden states, logits))."""
  import torch
  out = {}
  for family in FAMILIES:
    config = transformers.AutoConfig.for_model(family, **COMMON, **EXTRA[family])
    torch.manual_seed(0)
    model = transformers.AutoModelForMaskedLM.from_config(config).float().eval()
    with torch.no_grad():   # random norms and biases, so a swapped or dropped one shows up
      for name, p in model.named_parameters():
        if name.endswith('bias') or 'LayerNorm' in name or 'layer_norm' in name:
          p.copy_(torch.randn_like(p) * 0.5 + (name.endswith('weight')))
    folder = str(tmp_path_factory.mktemp(family))
    model.save_pretrained(folder)
    base = str(tmp_path_factory.mktemp(f'{family}_base'))
    getattr(model, family).save_pretrained(base)   # BertModel / RobertaModel: no MLM head
    tokens = np.where(MASK == 1, TOKENS, config.pad_token_id)   # RoBERTa positions need pads
    with torch.no_grad():
      result = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(MASK),
                     token_type_ids=torch.tensor(TYPES[family]), output_hidden_states=True)
    out[family] = (folder, base, tokens, (result.hidden_states[-1].numpy(),
                                          result.logits.numpy()))
  return out


def _ours(cfg, params, tokens, types):
  """(hidden states, MLM logits) of seedling's encoder, jitted once."""
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  both = lambda m, *a: (m.encode(*a, token_types=types), m(*a, token_types=types))
  run = jax.jit(lambda p: build_model(cfg).apply({'params': p}, tokens, positions, MASK,
                                                 method=both))
  return jax.tree.map(np.asarray, run(params))


@pytest.mark.parametrize('family', FAMILIES)
def test_import_equals_transformers(encoders, family):
  folder, base, tokens, want = encoders[family]
  cfg = hf.load_config(folder)
  assert (cfg.mlm_head, cfg.position_offset) == (True, 2 if family == 'roberta' else 0)
  params = hf.load_params(folder, cfg)
  real = MASK.astype(bool)
  for got, expected in zip(_ours(cfg, params, tokens, TYPES[family]), want):
    np.testing.assert_allclose(got[real], expected[real], atol=1e-4, rtol=1e-4)
  # The headless folder (no 'bert.' prefix) gives the same encoder, with no head parameters.
  base_cfg = hf.load_config(base)
  assert not base_cfg.mlm_head and base_cfg.tie_embeddings
  base_params = hf.load_params(base, base_cfg)
  assert set(base_params) == {'embed', 'encoder'}
  jax.tree.map(np.testing.assert_array_equal, base_params['encoder'], params['encoder'])


@pytest.mark.parametrize('family', FAMILIES)
def test_export_roundtrips_and_transformers_loads_it(encoders, transformers, family, tmp_path):
  """Both folders (with the MLM head and without) export to folders that import to the same
  config and params and that transformers runs to the original outputs."""
  import torch
  folder, base, tokens, (want_hidden, want_logits) = encoders[family]
  real = MASK.astype(bool)
  for src, auto in ((folder, transformers.AutoModelForMaskedLM), (base, transformers.AutoModel)):
    cfg = hf.load_config(src)
    params = hf.load_params(src, cfg)
    out = str(tmp_path / os.path.basename(src))
    hf.export(out, cfg, params)
    assert hf.load_config(out) == cfg
    jax.tree.map(np.testing.assert_array_equal, hf.load_params(out, cfg), params)
    model = auto.from_pretrained(out).float().eval()
    with torch.no_grad():
      result = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(MASK),
                     token_type_ids=torch.tensor(TYPES[family]), output_hidden_states=True)
    np.testing.assert_allclose(result.hidden_states[-1].numpy()[real], want_hidden[real],
                               atol=1e-4, rtol=1e-4)
    if cfg.mlm_head:
      np.testing.assert_allclose(result.logits.numpy()[real], want_logits[real], atol=1e-4,
                                 rtol=1e-4)


def test_export_refuses_a_non_bert_encoder(encoders):
  cfg = hf.load_config(encoders['bert'][0])
  with pytest.raises(ValueError, match=r"norm_position='pre' \(needs 'post'\)"):
    hf.families.hf_config(dataclasses.replace(cfg, norm_position='pre'))


def test_sharded_import_and_forward_equal_single_device(encoders):
  folder, _, tokens, want = encoders['bert']
  cfg = hf.load_config(folder)
  part = partitioner(data=2, fsdp=2, tensor=2)
  _, shardings = part.abstract(lambda r: build_model(cfg).init(
      r, tokens, tokens, MASK)['params'], jax.random.key(0))
  sharded = hf.load_params(folder, cfg, shardings)
  for a, s in zip(jax.tree.leaves(sharded), jax.tree.leaves(shardings)):
    assert a.sharding == s
  assert not sharded['embed']['embedding'].sharding.is_fully_replicated
  jax.tree.map(np.testing.assert_array_equal, sharded, hf.load_params(folder, cfg))
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  logits = part.jit(lambda p, t, s: build_model(cfg).apply(
      {'params': p}, t, positions, s, token_types=TYPES['bert']))(sharded, tokens, MASK)
  real = MASK.astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[real], want[1][real], atol=1e-4, rtol=1e-4)


def test_errors_name_the_tensor_and_option(encoders, tmp_path):
  folder = str(tmp_path / 'copy')
  shutil.copytree(encoders['bert'][0], folder)
  ckpt = safetensors_io.Checkpoint(folder)
  tensors = {n: np.array(ckpt.read(n)) for n in ckpt.names()}
  del tensors['bert.encoder.layer.1.output.LayerNorm.bias']
  tensors['cls.predictions.bias'] = np.zeros(95, np.float32)
  safetensors_io.write(os.path.join(folder, 'model.safetensors'), tensors)
  with pytest.raises(ValueError) as err:
    hf.load_params(folder, hf.load_config(folder))
  assert 'missing tensor bert.encoder.layer.1.output.LayerNorm.bias' in str(err.value)
  assert ('cls.predictions.bias: expected shape (96,) (for mlm_head/bias), found (95,)'
          in str(err.value))

  with open(os.path.join(folder, 'config.json')) as f:
    config = json.load(f)
  config.update(position_embedding_type='relative_key', hidden_act='silu')
  with pytest.raises(ValueError, match="hidden_act='silu'.*position_embedding_type="):
    hf.families.model_config(config)
  with pytest.raises(ValueError, match="model.norm_type='layernorm'.*family=encoder only"):
    build_model(ModelConfig(family='decoder', norm_type='layernorm'))
