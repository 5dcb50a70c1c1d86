"""The benchmark harness measures a real step and reports consistent numbers (speed itself is
never asserted: timings on a shared CPU are noise)."""

import pytest

from configs import t5
from configs.bench import get_config
from data.pipeline import target_length
from experiments.bench import (BENCHMARKS, load_config, random_batch, summary,
                               time_generation, time_train_step)
from model.config import ModelConfig
from model.flops import flops_per_token
from tests.helpers import partitioner, tiny_config
from train.trainer import Experiment


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


def test_encoder_decoder_flops_count_the_target_length_and_generation_is_timed():
  config = t5.get_config('tiny')
  config.model.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8,
                      mlp_dim=32)
  config.data.seq_len, config.train.batch_size = 32, 8   # a row per test device
  exp = Experiment.from_config(config)
  decoder_len = target_length(config)
  assert exp.flops_per_token() == flops_per_token(exp.model_cfg, 32, decoder_len)
  assert decoder_len < 32 and exp.flops_per_token() < flops_per_token(exp.model_cfg, 32)
  r = time_generation(config, steps=2, warmup=1)
  assert r['generated_tokens'] == decoder_len
  assert r['tokens_per_s'] == pytest.approx(8 * decoder_len / r['generate_time_s'])
  assert r['time_per_token_s'] == pytest.approx(r['generate_time_s'] / decoder_len)
  assert 0 < r['generate_time_min_s'] <= r['generate_time_s'] and r['compiled_peak_bytes'] > 0


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


def test_summary_pairs_jax_with_the_fastest_torch_of_the_same_round():
  line = lambda tps: {'tokens_per_s': tps}
  rounds = [{'jax': line(100.), 'torch-eager': line(80.), 'torch-compile': line(125.)},
            {'jax': line(60.), 'torch-eager': line(50.), 'torch-compile': line(40.)},
            {'jax': line(90.), 'torch-eager': {'error': ['killed']}, 'torch-compile': line(100.)}]
  out = summary('bench-s', 'keep', rounds)
  assert out['tokens_per_s'] == {'jax': 90., 'torch-eager': 65., 'torch-compile': 100.}
  # Per round 100/125, 60/50, 90/100: paired, so the machine's drift between rounds cancels.
  assert out['jax_over_fastest_torch_per_round'] == pytest.approx([0.8, 1.2, 0.9])
  assert out['jax_over_fastest_torch'] == pytest.approx(0.9)
  assert 'jax_over_fastest_torch' not in summary('t5-tiny', 'keep', [{'jax': line(5.)}])
