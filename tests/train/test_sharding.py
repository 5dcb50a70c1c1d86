"""The sharding layer: any mesh computes what one device computes, and shards as the rules say."""

import jax
import numpy as np
import pytest

from model import ModelConfig, build_model
from tests.helpers import packed_batch, partitioner, tiny_config
from train.objectives import build_objective
from train.sharding import Partitioner, make_mesh


def _loss_and_grads(part, objective, params, batch):
  """(loss sum, grads, param shardings) computed under `part`'s mesh with rule shardings."""
  _, shardings = part.abstract(objective.init_fn, jax.random.key(0))
  params = jax.device_put(params, shardings)
  batch = jax.device_put(batch, part.batch_sharding)
  fn = lambda p, b: jax.value_and_grad(
      lambda p: objective.loss_fn(p, b, jax.random.key(1), train=True)['loss'][0])(p)
  loss, grads = part.jit(fn, in_shardings=(shardings, part.batch_sharding),
                         out_shardings=(part.replicated, shardings))(params, batch)
  return loss, grads, params


@pytest.fixture(scope='module')
def setup():
  config = tiny_config()
  config.train.loss_chunk_tokens = 40   # the loss's logits in 4 chunks of 5 positions, 4 padded
  model = build_model(ModelConfig.from_dict(config.model.to_dict()))
  objective = build_objective('causal_lm', model, config)
  single = partitioner()
  params, _ = single.init(objective.init_fn, jax.random.key(0))
  batch = packed_batch(8, config.data.seq_len, config.model.vocab_size)
  loss, grads, _ = _loss_and_grads(single, objective, params, batch)
  return objective, params, batch, loss, grads


@pytest.mark.parametrize('axes', [dict(data=8), dict(fsdp=8), dict(data=2, fsdp=2, tensor=2),
                                  dict(tensor=4, data=2)], ids=str)
def test_sharded_equals_single_device(setup, axes):
  objective, params, batch, ref_loss, ref_grads = setup
  part = partitioner(**axes)
  loss, grads, placed = _loss_and_grads(part, objective, params, batch)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    # Sharded reductions sum in another order: compare at float32 noise of each tensor's scale.
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * float(np.abs(r).max()))
  # Parameters are really split the way the rules say.
  wi = placed['layers']['mlp']['wi_0']['kernel']        # ('layers', 'embed', 'mlp')
  query = placed['layers']['attn']['query']['kernel']   # ('layers', 'embed', 'heads', 'head_dim')
  fsdp, tensor = axes.get('fsdp', 1), axes.get('tensor', 1)
  assert wi.addressable_shards[0].data.shape == (2, 64 // fsdp, 128 // tensor)
  assert query.addressable_shards[0].data.shape == (2, 64 // fsdp, 8 // tensor, 16)


def test_mesh_larger_than_device_count_is_refused():
  with pytest.raises(ValueError, match='needs 16 devices but 8 exist'):
    make_mesh({'data': 2, 'fsdp': 4, 'tensor': 2, 'expert': 1})
  with pytest.raises(ValueError, match='does not divide the 8 devices'):
    make_mesh({'data': -1, 'fsdp': 3, 'tensor': 1, 'expert': 1})


def test_heads_not_divisible_by_tensor_axis_fails_before_compiling():
  config = tiny_config(num_heads=6, num_kv_heads=3)
  objective = build_objective('causal_lm', build_model(
      ModelConfig.from_dict(config.model.to_dict())), config)
  with pytest.raises(ValueError, match=r"attn/query/kernel dim 2 \(logical 'heads'\) has size 6"):
    partitioner(tensor=4, data=2).abstract(objective.init_fn, jax.random.key(0))


def test_replicated_parameters_are_reported():
  config = tiny_config()
  objective = build_objective('causal_lm', build_model(
      ModelConfig.from_dict(config.model.to_dict())), config)
  default = partitioner(tensor=4)
  abstract, shardings = default.abstract(objective.init_fn, jax.random.key(0))
  assert default.replicated_params(shardings, abstract) == []
  no_mlp = tuple(r for r in default.rules if r[0] != 'mlp')
  part = Partitioner(default.mesh, no_mlp)
  abstract, shardings = part.abstract(objective.init_fn, jax.random.key(0))
  assert part.replicated_params(shardings, abstract) == [
      'layers/mlp/wi_0/kernel', 'layers/mlp/wi_1/kernel', 'layers/mlp/wo/kernel']


def test_rules_naming_an_unknown_mesh_axis_are_refused():
  with pytest.raises(ValueError, match="names mesh axis 'model'"):
    Partitioner(partitioner().mesh, (('mlp', 'model'),))
