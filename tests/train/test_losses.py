"""token_cross_entropy over an OutputHead: values against numpy (argmax ties included) and
gradients against autodiff of the whole logits, for every chunking of the tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.layers import OutputHead
from train.objectives.losses import token_cross_entropy

Z_LOSS = 1e-2


def _case(with_bias: bool):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  logits[0, 0] = 0.0                        # all tied: argmax is index 0
  logits[0, 1, [2, 5]] = 9.0                # tied maximum: the first one counts
  targets = np.array([[0, 5, 1, 2, 3], [4, 4, 0, 6, 1]])
  targets[1, 2] = logits[1, 2].argmax()     # at least one right off the tie rows
  weights = np.array([[1, 1, 1, 0, 1], [1, 1, 1, 1, 0]], np.float32)
  # An identity kernel makes the hidden states the logits (minus the bias).
  bias = rng.normal(size=7).astype(np.float32) if with_bias else None
  hidden = logits - (bias if with_bias else 0.0)
  head = OutputHead(jnp.asarray(hidden), jnp.eye(7), None if bias is None else jnp.asarray(bias))
  return head, logits, targets, weights


@pytest.mark.parametrize('chunk_tokens', [0, 4, 2, 1])   # all; 2 (padded) and 1 positions
@pytest.mark.parametrize('with_bias', [False, True])
def test_token_cross_entropy_matches_numpy_and_breaks_ties_like_argmax(chunk_tokens, with_bias):
  head, logits, targets, weights = _case(with_bias)
  out = token_cross_entropy(head, jnp.asarray(targets), jnp.asarray(weights), Z_LOSS, chunk_tokens)

  log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  target_logit = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  ce = ((log_z - target_logit) * weights).sum()
  z = Z_LOSS * (log_z ** 2 * weights).sum()
  correct = ((logits.argmax(-1) == targets) * weights).sum()
  assert float(out['cross_entropy'][0]) == pytest.approx(ce, rel=1e-5)
  assert float(out['z_loss'][0]) == pytest.approx(z, rel=1e-5)
  assert float(out['loss'][0]) == pytest.approx(ce + z, rel=1e-5)
  assert float(out['accuracy'][0]) == correct and correct >= 2   # rows [0,0] and [1,2]
  assert float(out['accuracy'][1]) == weights.sum()


def _reference_loss(head: OutputHead, targets, weights):
  logits = head.logits()
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return ((log_z - target_logit + Z_LOSS * jnp.square(log_z)) * weights).sum()


@pytest.mark.parametrize('chunk_tokens', [0, 6, 2])
def test_token_cross_entropy_gradients_equal_autodiff_of_the_whole_logits(chunk_tokens):
  rng = np.random.default_rng(1)
  head = OutputHead(*(jnp.asarray(rng.normal(size=s), jnp.float32) for s in
                      [(2, 5, 3), (11, 3), (11,)]))
  targets = jnp.asarray(rng.integers(0, 11, (2, 5)))
  weights = jnp.asarray(rng.integers(0, 2, (2, 5)), jnp.float32)

  def chunked(head):   # the upstream factor checks the backward scales by the cotangent
    return 3.0 * token_cross_entropy(head, targets, weights, Z_LOSS, chunk_tokens)['loss'][0]

  got = jax.grad(chunked)(head)
  want = jax.grad(lambda h: 3.0 * _reference_loss(h, targets, weights))(head)
  for name in ('hidden', 'kernel', 'bias'):
    np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6,
                               err_msg=name)
  assert float(jnp.abs(got.kernel).max()) > 0.1



def test_a_frozen_output_projection_gets_no_gradient_work():
  """Differentiating the hidden states alone (a LoRA run's frozen head) forms dx only."""
  rng = np.random.default_rng(2)
  head = OutputHead(*(jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(2, 6, 3), (11, 3)]))
  targets = jnp.asarray(rng.integers(0, 11, (2, 6)))
  weights = jnp.ones((2, 6), jnp.float32)
  loss = lambda hidden, kernel: token_cross_entropy(OutputHead(hidden, kernel), targets, weights,
                                                    Z_LOSS, 4)['loss'][0]
  got = jax.grad(loss)(head.hidden, head.kernel)
  want = jax.grad(lambda h: _reference_loss(OutputHead(h, head.kernel), targets, weights))(
      head.hidden)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  jaxpr = lambda argnums: str(jax.make_jaxpr(jax.grad(loss, argnums))(head.hidden, head.kernel))
  dots = lambda argnums: jaxpr(argnums).count('dot_general')
  assert dots(0) == dots((0, 1)) - 1   # no x^T dlogits when the kernel is not differentiated
