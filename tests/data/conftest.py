"""Fixtures for data tests: a locked-like config, a batch sharding, the shared datasets folder."""

import os
import sys

if 'jax' not in sys.modules:
  os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from configs import base

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / 'shared' / 'datasets'


def make_config(**data_overrides) -> ml_collections.ConfigDict:
  """seed + train + data sections with small test sizes; overrides apply to config.data."""
  c = ml_collections.ConfigDict({'seed': 0, 'train': base.train_config(),
                                 'data': base.data_config()})
  c.train.batch_size = 8
  c.data.seq_len = 64
  c.data.synthetic_train_size = 2000
  c.data.synthetic_test_size = 200
  for k, v in data_overrides.items():
    c.data[k] = v
  return c


@pytest.fixture(scope='session')
def batch_sharding() -> jax.sharding.NamedSharding:
  """Leading (batch) dim split over every device, as the sharding layer does for batches."""
  mesh = jax.make_mesh((len(jax.devices()),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data', None))


@pytest.fixture
def shared_datasets() -> Path:
  """../shared/datasets, or a skip when this checkout has none."""
  if not SHARED.is_dir():
    pytest.skip(f'{SHARED} is absent (shared datasets are optional)')
  return SHARED


def host(batch: dict) -> dict:
  """A global batch as numpy arrays."""
  return {k: np.asarray(jax.device_get(v)) for k, v in batch.items()}
