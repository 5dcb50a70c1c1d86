"""Benchmark shapes for experiments/bench.py (Llama-style decoders, f32, one train step).

Presets: bench-s (vocab 4096, d 256, 4 layers, batch 8 x 256) and bench-m (vocab 8192, d 512,
8 layers, batch 8 x 512). experiments/torch_baseline.py builds the same shapes in PyTorch.
"""

from configs.base import base_config

SHAPES = {
    'bench-s': dict(model=dict(vocab_size=4096, d_model=256, num_layers=4, num_heads=4,
                               num_kv_heads=2, head_dim=64, mlp_dim=768),
                    batch_size=8, seq_len=256),
    'bench-m': dict(model=dict(vocab_size=8192, d_model=512, num_layers=8, num_heads=8,
                               num_kv_heads=4, head_dim=64, mlp_dim=1408),
                    batch_size=8, seq_len=512),
}


def get_config(preset: str = 'bench-s'):
  if preset not in SHAPES:
    raise ValueError(f'configs/bench.py: unknown preset {preset!r}; choose one of '
                     f'{sorted(SHAPES)}.')
  shape = SHAPES[preset]
  c = base_config()
  # Unrolled layers: 10% less CPU time per bench-s step than nn.scan on XLA:CPU (measured).
  # MKL matmuls on one CPU device (model/host_blas.py): bench-s and bench-m steps ~1.1x faster.
  c.model.update(activation='swiglu', dtype='float32', param_dtype='float32', scan_layers=False,
                 matmul_impl='auto', **shape['model'])
  c.data.seq_len = shape['seq_len']
  c.train.update(batch_size=shape['batch_size'], steps=100, warmup_steps=10,
                 learning_rate=1e-3)
  return c
