"""Tiny randomly initialised transformers models, saved once per test session."""

import pytest

FAMILIES = ('llama', 'mistral', 'qwen2', 'mixtral')
COMMON = dict(vocab_size=384, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-6)
EXTRA = {
    # original length 4 puts the 8 test positions past it, so the 3.1 scaling changes logits
    'llama': dict(rope_scaling={'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                                'high_freq_factor': 4.0, 'original_max_position_embeddings': 4}),
    'mistral': dict(sliding_window=None),
    'qwen2': dict(tie_word_embeddings=True),
    'mixtral': dict(num_local_experts=4, num_experts_per_tok=2),
}


@pytest.fixture(scope='session')
def transformers():
  pytest.importorskip('torch', reason='the hf extra (torch CPU) is not installed')
  return pytest.importorskip('transformers', reason='the hf extra (transformers) is not installed')


@pytest.fixture(scope='session')
def hf_models(transformers, tmp_path_factory):
  """family -> (folder, torch model in eval mode)."""
  import torch
  out = {}
  for family in FAMILIES:
    config = transformers.AutoConfig.for_model(family, **COMMON, **EXTRA[family])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():   # random (not zero) biases, so a dropped bias shows up
      for name, p in model.named_parameters():
        if name.endswith('bias'):
          p.normal_(0, 0.5)
    folder = str(tmp_path_factory.mktemp(family))
    model.save_pretrained(folder)
    out[family] = (folder, model)
  return out
