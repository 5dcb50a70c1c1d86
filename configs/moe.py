"""Causal-LM pretraining of mixture-of-experts decoders (model/moe.py).

Presets: tiny (CPU; the same shape and training as configs/lm.py:tiny, with the MLP of every
layer replaced by 8 experts of width 128, top-2 + 1 shared expert, dropless dispatch: the active
feed-forward width equals lm.py:tiny's mlp_dim=384), and real-scale shapes declared for
planning on big meshes: mixtral_8x7b and deepseek_v3 (DeepSeek-V3's multi-head latent
attention is approximated by plain multi-head attention of the same head count).
Launch: python -m experiments.run --config=configs/moe.py:tiny --workdir=DIR
"""

from configs import lm


def get_config(preset: str = 'tiny'):
  presets = {'tiny': _tiny, 'mixtral_8x7b': _mixtral_8x7b, 'deepseek_v3': _deepseek_v3}
  if preset not in presets:
    raise ValueError(f'configs/moe.py: unknown preset {preset!r}; choose one of {sorted(presets)}.')
  return presets[preset]()


def _tiny():
  c = lm.get_config('tiny')
  # Dropless: on CPU its 'blocked' grouped matmul costs about what capacity dispatch does.
  c.model.update(num_experts=8, num_experts_per_tok=2, num_shared_experts=1, expert_mlp_dim=128)
  return c


def _mixtral_8x7b():
  c = lm.get_config('llama3_8b')
  c.model.update(vocab_size=32_000, mlp_dim=14_336, rope_theta=1_000_000.0, num_experts=8,
                 num_experts_per_tok=2, load_balance_loss=0.02, router_z_loss=0.0)
  c.data.seq_len = 4096
  c.mesh.update(fsdp=-1, expert=8)
  return c


def _deepseek_v3():
  c = lm.get_config('llama3_8b')
  c.model.update(vocab_size=129_280, d_model=7168, num_layers=61, num_heads=128,
                 num_kv_heads=128, head_dim=128, mlp_dim=18_432, rope_theta=10_000.0,
                 norm_eps=1e-6, num_experts=256, num_experts_per_tok=8, num_shared_experts=1,
                 expert_mlp_dim=2048, first_dense_layers=3, router_score='sigmoid',
                 routed_scaling=2.5, load_balance_loss=1e-4, router_z_loss=0.0,
                 router_bias_update_rate=1e-3, moe_exchange_factor=2.0)
  # Dropless room for the worst case would be 64 devices x min(k, 4 local experts) / k = 32x
  # the mean pairs per device pair (5x the planned activation memory of this bound); what
  # overflows twice the mean is dropped and counted in moe_dropped.
  c.data.seq_len = 4096
  c.train.update(batch_size=1920, learning_rate=2.2e-4)
  c.mesh.update(fsdp=-1, expert=64)
  return c
