"""Tiny randomly initialised transformers models, saved once per test session."""

import json

import pytest

TEXT = ['the quick brown fox jumps over the lazy dog', 'hello world, how are you today?',
        'tokenizers turn text into ids and back'] * 20
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
FAMILIES = ('llama', 'mistral', 'qwen2', 'mixtral')
COMMON = dict(vocab_size=384, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-6)
EXTRA = {
    # original length 4 puts the 8 test positions past it, so the 3.1 scaling changes logits
    'llama': dict(rope_scaling={'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                                'high_freq_factor': 4.0, 'original_max_position_embeddings': 4}),
    # windows shorter than the 8 test positions, so a dropped window changes logits
    'mistral': dict(sliding_window=3),
    'qwen2': dict(tie_word_embeddings=True),
    'mixtral': dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=5),
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


@pytest.fixture(scope='session')
def qwen_like(tmp_path_factory):
  """A byte-level BPE tokenizer.json with Qwen-style specials and chat template."""
  tokenizers = pytest.importorskip('tokenizers', reason='the hf extra is not installed')
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  specials = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']
  tok.train_from_iterator(TEXT, tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=specials,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  folder = tmp_path_factory.mktemp('qwen_tok')
  tok.save(str(folder / 'tokenizer.json'))
  (folder / 'tokenizer_config.json').write_text(json.dumps(dict(
      eos_token='<|im_end|>', pad_token='<|endoftext|>', bos_token=None,
      chat_template=TEMPLATE, tokenizer_class='PreTrainedTokenizerFast')))
  return str(folder)
