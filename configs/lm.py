"""Causal-LM pretraining of the dense decoder.

Presets: tiny (CPU, seconds per hundred steps), small (bench-m shape), and real-scale shapes
declared for planning on big meshes (llama3_8b, llama3_70b).
Launch: python -m experiments.run --config=configs/lm.py:tiny --workdir=DIR
"""

from configs.base import base_config


def get_config(preset: str = 'tiny'):
  c = base_config()
  presets = {'tiny': _tiny, 'small': _small, 'llama3_8b': _llama3_8b, 'llama3_70b': _llama3_70b}
  if preset not in presets:
    raise ValueError(f'configs/lm.py: unknown preset {preset!r}; choose one of {sorted(presets)}.')
  presets[preset](c)
  return c


def _tiny(c):
  c.model.update(vocab_size=512, d_model=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=32, mlp_dim=384)
  c.data.seq_len = 128
  c.train.update(steps=500, batch_size=16, learning_rate=3e-3, warmup_steps=50)
  c.checkpoint.every_steps = 100


def _small(c):
  c.model.update(vocab_size=8192, d_model=512, num_layers=8, num_heads=8, num_kv_heads=4,
                 head_dim=64, mlp_dim=1408)
  c.data.seq_len = 512
  c.train.update(steps=2000, batch_size=8, learning_rate=1e-3, warmup_steps=100)


def _llama3(c, d_model, num_layers, num_heads, mlp_dim):
  c.model.update(vocab_size=128_256, d_model=d_model, num_layers=num_layers,
                 num_heads=num_heads, num_kv_heads=8, head_dim=128, mlp_dim=mlp_dim,
                 rope_theta=500_000.0, norm_eps=1e-5, dtype='bfloat16', remat_policy='full')
  c.data.seq_len = 8192
  c.train.update(batch_size=256, learning_rate=3e-4, warmup_steps=2000, steps=100_000)
  c.mesh.update(data=1, fsdp=-1)


def _llama3_8b(c):
  _llama3(c, d_model=4096, num_layers=32, num_heads=32, mlp_dim=14336)


def _llama3_70b(c):
  _llama3(c, d_model=8192, num_layers=80, num_heads=64, mlp_dim=28672)
