"""The GRPO objective against a plain per-token reference, in every averaging mode; REINFORCE at
β = 0 and ratio 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import grpo_loss

G, P, N, V = 4, 2, 5, 7  # group, prompts, completion positions, vocab
B = G * P
EPS, EPS_HIGH, BETA = 0.2, 0.28, 0.05


def _batch():
  """A hand-made batch: logits the loss differentiates, sampled tokens, old and reference
  log-probabilities chosen so that the clip is active on some tokens, lengths 2..5."""
  rng = np.random.RandomState(0)
  theta = jnp.asarray(rng.normal(size=(B, N, V)), jnp.float32)
  tokens = jnp.asarray(rng.randint(0, V, (B, N)))
  lengths = np.array([5, 3, 2, 4, 5, 5, 1, 3])
  mask = jnp.asarray(np.arange(N)[None] < lengths[:, None], jnp.float32)
  logp = _logp(theta, tokens)
  # old log-probabilities: ratio e^0.5 (above 1 + ε) on some tokens, e^-0.5 on others, near 1
  # elsewhere
  shift = rng.choice([-0.5, 0.0, 0.5, 0.05], size=(B, N))
  old = logp - jnp.asarray(shift, jnp.float32)
  ref = logp + jnp.asarray(rng.normal(scale=0.3, size=(B, N)), jnp.float32)
  rewards = jnp.asarray([1.0, 0.0, 0.0, 1.0, 0.5, 0.0, 2.0, 1.0])
  return theta, tokens, mask, old, ref, rewards, lengths


def _logp(theta, tokens):
  return jnp.take_along_axis(jax.nn.log_softmax(theta, -1), tokens[..., None], -1)[..., 0]


def _reference_loss(logp, old, ref, adv, lengths, loss_type, beta):
  """The formula of the papers sequence by sequence over its own tokens; then each mode's
  averaging."""
  per_seq, all_tokens, count = [], 0.0, 0
  for i in range(B):
    n = int(lengths[i])
    lp, o, rf = logp[i, :n], old[i, :n], ref[i, :n]
    ratio = jnp.exp(lp - o)
    clipped = jnp.clip(ratio, 1 - EPS, 1 + EPS_HIGH)
    surrogate = jnp.minimum(ratio * adv[i], clipped * adv[i])
    kl = jnp.exp(rf - lp) - (rf - lp) - 1
    terms = -(surrogate - beta * kl)
    per_seq.append(jnp.sum(terms) / n)
    all_tokens, count = all_tokens + jnp.sum(terms), count + n
  if loss_type == "grpo":
    return sum(per_seq) / B
  if loss_type == "dapo":
    return all_tokens / count
  return all_tokens / (B * N)  # dr_grpo: the constant N_max = N


def test_group_advantages():
  r = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.0, 2.0, 1.0])
  got = np.asarray(grpo_loss.group_advantages(jnp.asarray(r), G))
  groups = r.reshape(P, G)
  want = ((groups - groups.mean(1, keepdims=True))
          / (groups.std(1, keepdims=True) + grpo_loss.STD_EPS)).reshape(-1)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  unscaled = np.asarray(grpo_loss.group_advantages(jnp.asarray(r), G, scale=False))
  np.testing.assert_allclose(unscaled, (groups - groups.mean(1, keepdims=True)).reshape(-1),
                             rtol=1e-6)
  same = np.asarray(grpo_loss.group_advantages(jnp.ones(8), G))  # no signal in a group: 0
  np.testing.assert_array_equal(same, 0.0)


@pytest.mark.parametrize("loss_type", grpo_loss.LOSS_TYPES)
def test_loss_and_gradient_equal_a_plain_reference(loss_type):
  theta, tokens, mask, old, ref, rewards, lengths = _batch()
  adv = grpo_loss.group_advantages(rewards, G)

  def ours(th):
    return grpo_loss.grpo_loss(_logp(th, tokens), old, adv, mask, ref_logp=ref, epsilon=EPS,
                               epsilon_high=EPS_HIGH, beta=BETA, loss_type=loss_type).loss

  def plain(th):
    return _reference_loss(_logp(th, tokens), old, ref, adv, lengths, loss_type, BETA)

  terms = grpo_loss.grpo_loss(_logp(theta, tokens), old, adv, mask, ref_logp=ref, epsilon=EPS,
                              epsilon_high=EPS_HIGH, beta=BETA, loss_type=loss_type)
  assert 0.05 < float(terms.clip_fraction) < 0.6  # the clip is active on some tokens only
  assert float(terms.kl) > 0.01
  (l_ours, g_ours), (l_plain, g_plain) = (jax.jit(jax.value_and_grad(f))(theta)
                                          for f in (ours, plain))
  np.testing.assert_allclose(float(l_ours), float(l_plain), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(g_ours), np.asarray(g_plain), rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(g_ours).max()) > 1e-3
  # clip fraction: the tokens where the clipped term is the one the minimum takes
  ratio = np.exp(np.asarray(_logp(theta, tokens) - old))
  a = np.asarray(adv)[:, None]
  clipped = ((ratio < 1 - EPS) & (a < 0)) | ((ratio > 1 + EPS_HIGH) & (a > 0))
  m = np.asarray(mask)
  np.testing.assert_allclose(float(terms.clip_fraction), (clipped * m).sum() / m.sum(),
                             rtol=1e-6)


def test_beta_zero_first_update_is_reinforce_with_group_baseline_over_std():
  theta, tokens, mask, _, _, rewards, lengths = _batch()
  old = jax.lax.stop_gradient(_logp(theta, tokens))  # one update per batch: π_old = π_θ
  adv = grpo_loss.group_advantages(rewards, G)

  def ours(th):
    return grpo_loss.grpo_loss(_logp(th, tokens), old, adv, mask, beta=0.0).loss

  r = np.asarray(rewards).reshape(P, G)
  a = ((r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + grpo_loss.STD_EPS)).ravel()

  def reinforce(th):  # -1/B Σ_i A_i / |o_i| Σ_t log π(o_it)
    lp = _logp(th, tokens) * mask
    return -jnp.mean(jnp.asarray(a) * jnp.sum(lp, 1) / jnp.asarray(lengths, jnp.float32))

  np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(ours))(theta)),
                             np.asarray(jax.jit(jax.grad(reinforce))(theta)), rtol=1e-5,
                             atol=1e-7)


def test_errors_name_what_is_wrong():
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="loss_type"):
    grpo_loss.grpo_loss(x, x, jnp.zeros(2), x, loss_type="mean")
  with pytest.raises(ValueError, match="ref_logp"):
    grpo_loss.grpo_loss(x, x, jnp.zeros(2), x, beta=0.1)


def test_tokens_outside_a_top_p_set_keep_the_loss_and_gradient_finite():
  """-inf log-probabilities (a sampled token outside the policy's or the reference's top-p set):
  ratio 0 there, the KL floored, the loss and every gradient finite."""
  theta, tokens, mask, old, ref, rewards, _ = _batch()
  adv = grpo_loss.group_advantages(rewards, G)
  ref = ref.at[0, 1].set(-jnp.inf)
  excluded = jnp.zeros((B, N), bool).at[1, 0].set(True)   # the policy's own filter drops one

  def loss(th):
    lp = jnp.where(excluded, -jnp.inf, _logp(th, tokens))
    return grpo_loss.grpo_loss(lp, old, adv, mask, ref_logp=ref, beta=BETA).loss

  value, grad = jax.value_and_grad(loss)(theta)
  assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all()
  assert float(jnp.abs(grad).max()) > 1e-3
  assert float(grpo_loss.k3_kl(jnp.asarray(-2.0), jnp.asarray(-jnp.inf))) == pytest.approx(
      np.exp(grpo_loss.LOGP_FLOOR + 2.0) - (grpo_loss.LOGP_FLOOR + 2.0) - 1.0)
