"""T5-style encoder–decoder pretraining by span corruption (model/t5.py, T5 v1.1 conventions:
relative position bias, unscaled attention logits, gated-GELU MLP, untied output, no biases).

Presets: tiny (CPU, byte tokenizer on the synthetic corpus); tiny_prefix_lm (the same model
trained as a prefix-LM on plain 'lm' rows: encoder reads a random prefix of each example, decoder
continues it); and shapes declared for planning: small, base and xl (T5 v1.1 sizes;
SentencePiece vocabulary of 32k + 100 sentinels).
Launch: python -m experiments.run --config=configs/t5.py:tiny --workdir=DIR
"""

from configs.base import base_config


def get_config(preset: str = 'tiny'):
  c = base_config()
  presets = {'tiny': _tiny, 'tiny_prefix_lm': _tiny_prefix_lm, 'small': _small, 'base': _base,
             'xl': _xl}
  if preset not in presets:
    raise ValueError(f'configs/t5.py: unknown preset {preset!r}; choose one of {sorted(presets)}.')
  c.objective.name = 'span_corruption'
  c.data.task = 'span_corruption'
  c.model.update(family='t5', activation='geglu', position_embedding='relative',
                 scale_attention=False, tie_embeddings=False, relative_buckets=32,
                 relative_max_distance=128)
  presets[preset](c)
  return c


def _tiny(c):
  c.model.update(vocab_size=384, d_model=64, num_layers=2, num_heads=4, num_kv_heads=4,
                 head_dim=16, mlp_dim=128)
  c.data.seq_len = 128
  c.train.update(steps=300, batch_size=16, learning_rate=3e-3, warmup_steps=30,
                 eval_every_steps=100, eval_batches=2, eval_decode_batches=1)
  c.checkpoint.every_steps = 100


def _tiny_prefix_lm(c):
  _tiny(c)
  c.objective.name, c.data.task = 'prefix_lm', 'lm'


def _v1_1(c, d_model, num_layers, num_heads, head_dim, mlp_dim):
  c.model.update(vocab_size=32_128, d_model=d_model, num_layers=num_layers, num_heads=num_heads,
                 num_kv_heads=num_heads, head_dim=head_dim, mlp_dim=mlp_dim,
                 dropout_rate=0.0, dtype='bfloat16')
  c.data.update(seq_len=512, target_len=114)
  c.train.update(steps=524_288, batch_size=128, learning_rate=1e-2, warmup_steps=10_000)
  c.mesh.update(data=1, fsdp=-1)


def _small(c):
  _v1_1(c, d_model=512, num_layers=8, num_heads=6, head_dim=64, mlp_dim=1024)


def _base(c):
  _v1_1(c, d_model=768, num_layers=12, num_heads=12, head_dim=64, mlp_dim=2048)


def _xl(c):
  _v1_1(c, d_model=2048, num_layers=24, num_heads=32, head_dim=64, mlp_dim=5120)
  c.model.remat_policy = 'full'
