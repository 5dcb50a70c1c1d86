"""Original T5 and T5 v1.1: import equals transformers (padded encoder and decoder batches),
export round-trips and transformers reloads it with the same logits."""

import jax
import numpy as np
import pytest

import model.hf as hf
from model import build_model

ENC = np.random.RandomState(0).randint(0, 64, (2, 7))
DEC = np.random.RandomState(1).randint(0, 64, (2, 5))
ENC_MASK = np.array([[1] * 7, [1] * 4 + [0] * 3])
DEC_MASK = np.array([[1] * 5, [1] * 3 + [0] * 2])


def _hf_logits(model):
  import torch
  with torch.no_grad():
    return model(input_ids=torch.tensor(ENC), attention_mask=torch.tensor(ENC_MASK),
                 decoder_input_ids=torch.tensor(DEC),
                 decoder_attention_mask=torch.tensor(DEC_MASK)).logits.numpy()


def _logits(cfg, params):
  pos = lambda x: np.broadcast_to(np.arange(x.shape[1]), x.shape)
  return np.asarray(jax.jit(build_model(cfg).apply)({'params': params}, ENC, pos(ENC), ENC_MASK,
                                                    DEC, pos(DEC), DEC_MASK))


def _assert_close_where_real(got, want):
  """Logits of real (unpadded) decoder tokens agree; padded ones are free."""
  np.testing.assert_allclose(got[DEC_MASK > 0], want[DEC_MASK > 0], atol=1e-4, rtol=1e-4)


# transformers 5 writes tie_word_embeddings=true for both and marks v1.1 by
# scale_decoder_outputs=false (no 1/sqrt(d_model) on the logits).
@pytest.mark.parametrize('feed_forward, tied', [('relu', True), ('gated-gelu', False)],
                         ids=['original', 'v1.1'])
def test_t5_import_export(transformers, tmp_path, feed_forward, tied):
  import torch
  config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                 num_decoder_layers=3, num_heads=4, feed_forward_proj=feed_forward,
                                 tie_word_embeddings=tied)
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(config).eval()
  model.save_pretrained(tmp_path / 't5')
  cfg = hf.load_config(str(tmp_path / 't5'))
  assert (cfg.activation, cfg.tie_embeddings) == (('relu', True) if tied else ('geglu', False))
  params = hf.load_params(str(tmp_path / 't5'), cfg)
  want = _hf_logits(model)
  _assert_close_where_real(_logits(cfg, params), want)
  hf.export(str(tmp_path / 'out'), cfg, params)
  again = hf.load_params(str(tmp_path / 'out'), hf.load_config(str(tmp_path / 'out')))
  jax.tree.map(np.testing.assert_array_equal, again, params)
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / 'out').eval()
  _assert_close_where_real(_hf_logits(reloaded), want)


def test_t5_unknown_feed_forward_refused():
  with pytest.raises(ValueError, match="feed_forward_proj='gated-silu' is not supported"):
    hf.families.model_config(dict(model_type='t5', feed_forward_proj='gated-silu'))
