"""Test session setup: 8 fake CPU devices, set before anything imports jax."""

import os
import pathlib

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / 'shared' / 'datasets'


@pytest.fixture
def shared_datasets() -> pathlib.Path:
  """../shared/datasets, or a skip where this checkout has none beside it."""
  if not SHARED_DATASETS.is_dir():
    pytest.skip(f'{SHARED_DATASETS} is absent (real-data tests need shared/datasets beside the repo)')
  return SHARED_DATASETS
