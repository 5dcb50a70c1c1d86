"""Original T5: import equals transformers (padded encoder batch), export round-trips."""

import jax
import numpy as np
import pytest

import model.hf as hf
from model import build_model


def _logits(model, e, em, d):
  import torch
  with torch.no_grad():
    return model(input_ids=torch.tensor(e), attention_mask=torch.tensor(em),
                 decoder_input_ids=torch.tensor(d)).logits.numpy()


def test_t5_import_export(transformers, tmp_path):
  import torch
  config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                 num_heads=4, feed_forward_proj='relu', tie_word_embeddings=True)
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(config).eval()
  model.save_pretrained(tmp_path / 't5')
  cfg = hf.load_config(str(tmp_path / 't5'))
  params = hf.load_params(str(tmp_path / 't5'), cfg)
  e, d = np.random.RandomState(0).randint(0, 64, (2, 7)), np.random.RandomState(1).randint(0, 64, (2, 5))
  em = np.array([[1] * 7, [1] * 4 + [0] * 3])
  pos = lambda x: np.broadcast_to(np.arange(x.shape[1]), x.shape)
  got = np.asarray(build_model(cfg).apply({'params': params}, e, pos(e), em, d, pos(d),
                                          np.ones_like(d)))
  want = _logits(model, e, em, d)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  hf.export(str(tmp_path / 'out'), cfg, params)
  again = hf.load_params(str(tmp_path / 'out'), hf.load_config(str(tmp_path / 'out')))
  jax.tree.map(np.testing.assert_array_equal, again, params)
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / 'out').eval()
  np.testing.assert_allclose(_logits(reloaded, e, em, d), want, atol=1e-4, rtol=1e-4)


def test_t5_gated_refused():
  with pytest.raises(ValueError, match="feed_forward_proj='gated-gelu' is not supported"):
    hf.families.model_config(dict(model_type='t5', feed_forward_proj='gated-gelu'))
