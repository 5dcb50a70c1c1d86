"""The benchmark harness measures a real step and reports consistent numbers (speed itself is
never asserted: timings on a shared CPU are noise)."""

import pytest

from configs.bench import get_config
from experiments.bench import BENCHMARKS, load_config, random_batch, time_train_step
from model.config import ModelConfig
from model.flops import flops_per_token
from tests.helpers import partitioner, tiny_config


def test_bench_presets_have_the_issue_shapes():
  s, m = get_config('bench-s'), get_config('bench-m')
  assert (s.model.vocab_size, s.model.d_model, s.model.num_layers, s.model.num_heads,
          s.model.num_kv_heads, s.model.head_dim, s.model.mlp_dim) == (4096, 256, 4, 4, 2, 64, 768)
  assert (s.train.batch_size, s.data.seq_len, s.model.dtype) == (8, 256, 'float32')
  assert (m.model.vocab_size, m.model.d_model, m.model.num_layers, m.model.num_heads,
          m.model.num_kv_heads, m.model.mlp_dim) == (8192, 512, 8, 8, 4, 1408)
  assert (m.train.batch_size, m.data.seq_len) == (8, 512)


def test_time_train_step_reports_consistent_fields():
  config = tiny_config()
  config.mesh.update(data=2, fsdp=2, tensor=2)
  r = time_train_step(config, steps=3, warmup=1)
  tokens = config.train.batch_size * config.data.seq_len
  assert r['tokens_per_s'] == pytest.approx(tokens / r['step_time_s'])
  fpt = flops_per_token(ModelConfig.from_dict(config.model.to_dict()), config.data.seq_len)
  assert r['model_flops_per_token'] == fpt
  assert r['mfu'] == pytest.approx(r['achieved_flops_per_s'] / r['peak_flops_per_s'])
  assert 0 < r['step_time_min_s'] <= r['step_time_s'] and r['compile_s'] > 0
  assert r['compiled_peak_bytes'] > 0 and r['devices'] == 8
  assert 0 < r['final_loss'] < 10


def test_random_batch_matches_task_format():
  config = tiny_config()
  batch = random_batch(config, partitioner(data=2).batch_sharding)
  assert set(batch) == {'inputs', 'targets', 'segment_ids', 'positions', 'loss_mask'}
  assert batch['inputs'].shape == (config.train.batch_size, config.data.seq_len)
  assert int(batch['inputs'].max()) < config.model.vocab_size


def test_unknown_benchmark_names_the_choices():
  assert {'bench-s', 'bench-m'} <= set(BENCHMARKS)
  with pytest.raises(ValueError, match='bench-s'):
    load_config('bench-xl')
