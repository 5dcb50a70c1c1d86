"""Masked-LM pretraining of the encoder-only model (model/encoder.py: T5's encoder stack and an
output head; BERT 80/10/10 masking by the data layer's 'mlm' task, loss on masked tokens only).

Presets: tiny (CPU, byte tokenizer on the synthetic corpus).
Launch: python -m experiments.run --config=configs/mlm.py:tiny --workdir=DIR
"""

from configs.base import base_config


def get_config(preset: str = 'tiny'):
  c = base_config()
  presets = {'tiny': _tiny}
  if preset not in presets:
    raise ValueError(f'configs/mlm.py: unknown preset {preset!r}; choose one of {sorted(presets)}.')
  c.objective.name = 'mlm'
  c.data.task = 'mlm'
  c.model.update(family='encoder', activation='geglu', position_embedding='relative',
                 scale_attention=False)
  presets[preset](c)
  return c


def _tiny(c):
  c.model.update(vocab_size=384, d_model=64, num_layers=2, num_heads=4, num_kv_heads=4,
                 head_dim=16, mlp_dim=128)
  c.data.seq_len = 128
  c.train.update(steps=600, batch_size=16, learning_rate=3e-3, warmup_steps=30)
  c.checkpoint.every_steps = 100
