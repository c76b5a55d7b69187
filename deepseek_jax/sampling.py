"""Next-token choice from logits: greedy, temperature, top-k and top-p (nucleus), as pure functions.

The order follows the usual convention (and transformers' `generate`): logits are divided by the
temperature, then restricted to the k most likely tokens, then to the smallest set of the most
likely tokens whose probability reaches `top_p`; a token is drawn from what is left. Temperature 0
means argmax (no randomness, the filters are moot).

The settings are Python values (static under jit): each distinct setting compiles its own
decoding loop, which is what a generation call wants anyway.

Log-probabilities (`token_logprobs`, `sample_with_logprob`) are those of the distribution a token
is actually drawn from: log softmax of the filtered, temperature-scaled logits (a token outside
the top-k / top-p set has -inf). Greedy decoding draws from a point mass: its log-probability is
0. The RL learner recomputes its policy's log-probabilities with the same function, so the
sampler's and the learner's numbers describe one distribution.

Legend: B batch, V vocab.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to pick each next token (hashable: a static argument of the jitted loops)."""
  temperature: float = 0.0  # 0: greedy (argmax)
  top_k: int | None = None  # keep the k most likely tokens; None or 0: all
  top_p: float | None = None  # keep the smallest most-likely set of probability >= top_p; None: all

  def __post_init__(self):
    if not self.temperature >= 0.0:  # also rejects NaN
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k is not None and self.top_k < 0:
      raise ValueError(f"top_k must be >= 1 (or None/0 for no limit), got {self.top_k}")
    if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
  """Boolean [B, V]: exactly the k highest logits of each row (ties broken by lower index)."""
  _, idx = jax.lax.top_k(logits, k)  # [B, k]
  rows = jnp.arange(logits.shape[0])[:, None]
  return jnp.zeros(logits.shape, jnp.bool_).at[rows, idx].set(True)


def top_p_mask(logits: jax.Array, p: float) -> jax.Array:
  """Boolean [B, V]: the smallest set of most likely tokens whose probability reaches p.

  A token is kept when the probability of the strictly more likely tokens is still below p, so
  the most likely token is always kept.
  """
  order = jnp.argsort(-logits, axis=-1, stable=True)  # [B, V] most likely first
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
  keep_sorted = before < p  # [B, V]; the first is always kept (nothing before it, p > 0)
  rows = jnp.arange(logits.shape[0])[:, None]
  return jnp.zeros(logits.shape, jnp.bool_).at[rows, order].set(keep_sorted)


def filter_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
  """Temperature-scaled float32 logits [B, V] with the excluded tokens set to -inf."""
  x = logits.astype(jnp.float32) / params.temperature
  if params.top_k:
    x = jnp.where(top_k_mask(x, min(params.top_k, x.shape[-1])), x, _NEG_INF)
  if params.top_p is not None and params.top_p < 1.0:
    x = jnp.where(top_p_mask(x, params.top_p), x, _NEG_INF)
  return x


def sample(logits: jax.Array, key: jax.Array, params: SamplingParams) -> jax.Array:
  """One token per row of logits [B, V] -> int32 [B]."""
  if params.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits, params), axis=-1).astype(jnp.int32)


def token_logprobs(logits: jax.Array, tokens: jax.Array, params: SamplingParams) -> jax.Array:
  """log p(token) under the distribution `sample` draws from: logits [..., V], tokens [...] int
  -> float32 [...] (see the module docstring; 0 for greedy, -inf outside a top-k/top-p set).
  Differentiable in the logits (the filter's choice of tokens is a constant)."""
  tokens = tokens.astype(jnp.int32)
  if params.greedy:
    return jnp.zeros(tokens.shape, jnp.float32)
  lead = logits.shape[:-1]
  flat = filter_logits(logits.reshape(-1, logits.shape[-1]), params)       # [N, V]
  logp = jax.nn.log_softmax(flat, axis=-1)
  picked = jnp.take_along_axis(logp, tokens.reshape(-1, 1), axis=-1)[:, 0]  # [N]
  return picked.reshape(lead)


def sample_with_logprob(logits: jax.Array, key: jax.Array, params: SamplingParams
                        ) -> tuple[jax.Array, jax.Array]:
  """`sample` and the chosen tokens' `token_logprobs`: (int32 [B], float32 [B])."""
  if params.greedy:
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return token, jnp.zeros(token.shape, jnp.float32)
  x = filter_logits(logits, params)                                          # [B, V]
  token = jax.random.categorical(key, x, axis=-1).astype(jnp.int32)
  logp = jnp.take_along_axis(jax.nn.log_softmax(x, axis=-1), token[:, None], axis=-1)[:, 0]
  return token, logp
