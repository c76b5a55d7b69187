"""Sampling: greedy is argmax; top-k / top-p never leave their allowed sets; seeds reproduce."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.sampling import SamplingParams, filter_logits, sample, top_k_mask, top_p_mask

V = 50
DRAWS = 2000


def _logits(b=4, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randn(b, V).astype(np.float32) * 2.0)


def _draws(logits, params, seed=0):
  """DRAWS samples per row: int [DRAWS, B]."""
  keys = jax.random.split(jax.random.key(seed), DRAWS)
  return np.asarray(jax.jit(jax.vmap(lambda k: sample(logits, k, params)))(keys))


def test_temperature_zero_is_argmax():
  logits = _logits()
  out = sample(logits, jax.random.key(0), SamplingParams(0.0, top_k=3, top_p=0.5))
  np.testing.assert_array_equal(out, np.argmax(logits, -1))


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_stays_in_the_k_best(k):
  logits = _logits()
  draws = _draws(logits, SamplingParams(1.0, top_k=k))
  best = np.argsort(-np.asarray(logits), axis=-1)[:, :k]
  for b in range(logits.shape[0]):
    seen = set(draws[:, b].tolist())
    assert seen <= set(best[b].tolist())
    assert len(seen) == k  # every allowed token does come up over 2000 draws
  assert top_k_mask(logits, k).sum(-1).tolist() == [k] * logits.shape[0]


@pytest.mark.parametrize("p", [0.3, 0.8, 0.95])
def test_top_p_stays_in_the_nucleus(p):
  logits = _logits(seed=1)
  probs = np.asarray(jax.nn.softmax(logits, -1), np.float64)
  draws = _draws(logits, SamplingParams(1.0, top_p=p), seed=1)
  for b in range(logits.shape[0]):
    order = np.argsort(-probs[b])
    cum = np.cumsum(probs[b][order])
    n = int(np.searchsorted(cum, p) + 1)  # smallest prefix of probability >= p
    allowed = set(order[:n].tolist())
    assert set(draws[:, b].tolist()) <= allowed
    assert set(np.flatnonzero(np.asarray(top_p_mask(logits, p))[b]).tolist()) == allowed


def test_top_k_then_top_p_and_temperature():
  logits = _logits(seed=2)
  params = SamplingParams(0.7, top_k=5, top_p=0.6)
  filtered = np.asarray(filter_logits(logits, params))
  kept = np.isfinite(filtered)
  best5 = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
  for b in range(logits.shape[0]):
    assert set(np.flatnonzero(kept[b]).tolist()) <= set(best5[b].tolist())
    np.testing.assert_allclose(filtered[b, kept[b]], np.asarray(logits)[b, kept[b]] / 0.7,
                               rtol=1e-6)
  draws = _draws(logits, params)
  for b in range(logits.shape[0]):
    assert set(draws[:, b].tolist()) <= set(np.flatnonzero(kept[b]).tolist())


def test_frequencies_follow_the_tempered_distribution():
  logits = _logits(b=1, seed=3)
  draws = _draws(logits, SamplingParams(2.0))[:, 0]
  freq = np.bincount(draws, minlength=V) / DRAWS
  np.testing.assert_allclose(freq, np.asarray(jax.nn.softmax(logits[0] / 2.0)), atol=0.04)


def test_same_seed_same_output_different_seeds_differ():
  logits = _logits()
  params = SamplingParams(1.0, top_p=0.9)
  a, b = _draws(logits, params, seed=5), _draws(logits, params, seed=5)
  np.testing.assert_array_equal(a, b)
  assert (a != _draws(logits, params, seed=6)).mean() > 0.3


@pytest.mark.parametrize("kw", [dict(temperature=-0.1), dict(temperature=float("nan")),
                                dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_settings(kw):
  with pytest.raises(ValueError):
    SamplingParams(**dict(dict(temperature=1.0), **kw))
