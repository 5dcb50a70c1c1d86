"""KV-cached generation (left-padded prompts of different lengths in one batch, sharded params):
equal to uncached recomputation token by token, greedy and sampled, and to transformers'
greedy generate."""

import shutil

import jax
import numpy as np
import pytest

from experiments.generate import HFModel, left_pad
from model import build_model
from model.decoding import decoder_generate, sample

PROMPTS = [[5, 17, 99, 3, 42], [7, 250], [11, 12, 13]]
COMPILE = '/jax/core/compile/backend_compile_duration'
NEW = 5


@pytest.fixture(scope='module')
def loaded(hf_models, qwen_like, tmp_path_factory):
  """family -> HFModel of the tiny transformers model, with a tokenizer, on fsdp=4 x tensor=2."""
  out = {}
  for family in ('llama', 'qwen2', 'mistral'):
    local = tmp_path_factory.mktemp(f'{family}_gen')
    shutil.copytree(hf_models[family][0], local, dirs_exist_ok=True)
    for name in ('tokenizer.json', 'tokenizer_config.json'):
      shutil.copy(f'{qwen_like}/{name}', local / name)
    out[family] = HFModel.load(str(local), mesh={'fsdp': 4, 'tensor': 2})
  return out


@pytest.mark.parametrize('family', ['qwen2', 'mistral'])   # mistral: a 3-token sliding window
def test_cached_equals_uncached_recomputation(loaded, family):
  hf_model = loaded[family]
  model = build_model(hf_model.cfg)
  batch, lengths = left_pad(PROMPTS)
  rng = jax.random.key(3)
  forward = jax.jit(lambda p, t, pos, seg: model.apply({'params': p}, t, pos, seg))
  for temperature in (0.0, 0.8):
    tokens, logprobs = hf_model.partitioner.jit(lambda p, b, n: decoder_generate(
        model, p, b, n, rng, steps=NEW, temperature=temperature))(hf_model.params, batch,
                                                                  lengths)
    # One uncached forward over prompt + generated tokens, same padding and positions.
    full = np.concatenate([batch, np.asarray(tokens)], axis=1)
    pad = batch.shape[1] - lengths[:, None]
    slots = np.arange(full.shape[1])[None]
    logits = forward(hf_model.params, full, np.maximum(slots - pad, 0),
                     (slots >= pad).astype(np.int32))
    at = logits[:, batch.shape[1] - 1:-1]                   # the logits each step chose from
    for i in range(NEW):
      want = sample(at[:, i], jax.random.fold_in(rng, i), temperature)
      np.testing.assert_array_equal(tokens[:, i], want)
    want_logprobs = np.take_along_axis(jax.nn.log_softmax(at), np.asarray(tokens)[..., None], -1)
    np.testing.assert_allclose(logprobs, want_logprobs[..., 0], atol=1e-5)
    assert len({tuple(r) for r in np.asarray(tokens).tolist()}) > 1   # rows differ


def test_greedy_matches_transformers(loaded, hf_models):
  import torch
  hf_model, torch_model = loaded['llama'], hf_models['llama'][1]
  ours = hf_model.generate_ids(PROMPTS, NEW)
  eos = hf_model.tokenizer.eos_id
  for prompt, got in zip(PROMPTS, ours):
    with torch.no_grad():
      want = torch_model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False,
                                  eos_token_id=eos, pad_token_id=hf_model.tokenizer.pad_id)
    assert got == want[0, len(prompt):].tolist()
  assert eos in ours[1]   # one row stops early: what follows its eos is cut
  # Other prompt lengths in the same width bucket reuse the compiled program.
  compiles = []
  listener = lambda event, secs, **kw: compiles.append(event) if event == COMPILE else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    again = hf_model.generate_ids([p[:1] + p for p in PROMPTS], NEW)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == [] and len(again) == len(PROMPTS)
  assert isinstance(hf_model.complete('the lazy', 4), str)
  with pytest.raises(ValueError, match='at least one token'):
    hf_model.generate_ids([[1], []], 2)
