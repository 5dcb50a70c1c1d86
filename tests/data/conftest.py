"""Helpers for data tests: a small config, a batch sharding, batches as numpy."""

import jax
import ml_collections
import numpy as np
import pytest

from configs import base


def make_config(**data_overrides) -> ml_collections.ConfigDict:
  """The base config with small data sizes; keyword overrides apply to config.data."""
  c = base.base_config()
  c.train.batch_size = 8
  c.data.seq_len = 64
  c.data.synthetic_train_size = 2000
  c.data.synthetic_test_size = 200
  c.data.update(data_overrides)
  return c


@pytest.fixture(scope='session')
def batch_sharding() -> jax.sharding.NamedSharding:
  """Leading (batch) dim split over every device, as the sharding layer does for batches."""
  mesh = jax.make_mesh((len(jax.devices()),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data', None))


def host(batch: dict) -> dict:
  """A global batch as numpy arrays."""
  return {k: np.asarray(jax.device_get(v)) for k, v in batch.items()}
