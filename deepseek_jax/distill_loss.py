"""Logit distillation losses: the forward KL from a teacher to a student, full or on the teacher's
top-k tokens.

With temperature τ, teacher logits z_T and student logits z_S at one position:
  p = softmax(z_T / τ),  q = softmax(z_S / τ)
  full:  KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)
  top-k: S = the k tokens with the largest teacher logits; the rest of the vocabulary is one
         bucket "r" with p_r = 1 − Σ_{v∈S} p_v and q_r = 1 − Σ_{v∈S} q_v:
         KL_k(p ‖ q) = Σ_{v∈S} p_v (log p_v − log q_v) + p_r (log p_r − log q_r)
The top-k form is the KL between the two distributions collapsed onto S ∪ {r}: the teacher's
remaining mass is kept (not renormalised away), so the student is taught how much probability
lies outside S but is free to spread it there as it likes. It is never above the full KL (the
collapse is a deterministic map, so the data-processing inequality applies), is zero exactly when
q agrees with p on S, and equals the full KL when k = V (p_r = 0, and 0·log 0 = 0). Both sides'
log p_r and log q_r are computed as a log-sum-exp over the tokens outside S, never as log(1 − Σ),
which loses every digit when Σ is near 1. The teacher's side (`teacher_topk`: k ids, k log-probs
and log p_r per position) is all a stored or sharded teacher needs to provide.

The loss is τ² · (mean of the per-position KL over the masked positions): τ² keeps gradient
magnitudes comparable across temperatures (Hinton et al., 2015). Forward KL (teacher first) is
mode-covering: the student is penalised wherever the teacher puts mass it does not.

Legend: B batch, T positions, V vocabulary, K the teacher's top-k. Everything in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class TeacherTopK(NamedTuple):
  """The teacher's side of the top-k KL at temperature τ."""
  idx: jax.Array       # [B, T, K] int32: the k most likely tokens
  logp: jax.Array      # [B, T, K] float32: log p of each (under the full softmax)
  log_rest: jax.Array  # [B, T] float32: log p_r, the mass outside the k (-inf when k = V)


def _log_softmax(logits: jax.Array, temperature: float) -> jax.Array:
  return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def _in_set(idx: jax.Array, vocab: int) -> jax.Array:
  """[B, T, V] bool: True at the ids idx [B, T, K] (a scatter: no [B, T, K, V] one-hot)."""
  flat = idx.reshape(-1, idx.shape[-1])                                   # [B*T, K]
  hit = jax.vmap(lambda i: jnp.zeros((vocab,), bool).at[i].set(True))(flat)
  return hit.reshape(idx.shape[:-1] + (vocab,))


def _log_outside(logp: jax.Array, inside: jax.Array) -> jax.Array:
  """log Σ_{v ∉ S} exp(logp_v) [B, T] (-inf when S is everything)."""
  return jax.nn.logsumexp(jnp.where(inside, -jnp.inf, logp), axis=-1)


def teacher_topk(teacher_logits: jax.Array, k: int, temperature: float = 1.0) -> TeacherTopK:
  """The teacher's k most likely tokens, their log-probabilities and log p_r (see above)."""
  vocab = teacher_logits.shape[-1]
  if not 1 <= k <= vocab:
    raise ValueError(f"top-k distillation: k={k} must be in [1, vocab_size={vocab}]")
  logp = _log_softmax(teacher_logits, temperature)                       # [B, T, V]
  top, idx = jax.lax.top_k(logp, k)                                      # [B, T, K]
  rest = _log_outside(logp, _in_set(idx, vocab))                         # [B, T]
  return TeacherTopK(idx.astype(jnp.int32), top, rest)


def kl_full(teacher_logits: jax.Array, student_logits: jax.Array,
            temperature: float = 1.0) -> jax.Array:
  """KL(p ‖ q) at each position [B, T] from full logits [B, T, V]."""
  logp = _log_softmax(teacher_logits, temperature)                       # [B, T, V]
  logq = _log_softmax(student_logits, temperature)                       # [B, T, V]
  p = jnp.exp(logp)
  # p_v = 0 (underflow) contributes 0, and its log p_v = -inf must not turn that into nan
  return jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1)


def kl_topk(teacher: TeacherTopK, student_logits: jax.Array,
            temperature: float = 1.0) -> jax.Array:
  """KL_k(p ‖ q) at each position [B, T] from the teacher's top-k and student logits [B, T, V]."""
  logq = _log_softmax(student_logits, temperature)                       # [B, T, V]
  logp = teacher.logp.astype(jnp.float32)                                # [B, T, K]
  logq_k = jnp.take_along_axis(logq, teacher.idx, axis=-1)               # [B, T, K]
  head = jnp.sum(jnp.exp(logp) * (logp - logq_k), axis=-1)               # [B, T]
  log_pr = teacher.log_rest.astype(jnp.float32)                          # [B, T]
  tail = jnp.isfinite(log_pr)                                            # p_r > 0
  # Where p_r = 0 the bucket term is 0; the student's bucket is then taken over the whole
  # vocabulary instead (finite, and multiplied by a zero cotangent), so no nan leaks into the
  # gradient when S covers the vocabulary.
  inside = _in_set(teacher.idx, logq.shape[-1]) & tail[..., None]        # [B, T, V]
  log_qr = _log_outside(logq, inside)                                    # [B, T]
  safe_pr = jnp.where(tail, log_pr, 0.0)
  bucket = jnp.where(tail, jnp.exp(safe_pr) * (safe_pr - log_qr), 0.0)   # [B, T]
  return head + bucket


def per_position_kl(teacher: jax.Array | TeacherTopK, student_logits: jax.Array,
                    temperature: float = 1.0) -> jax.Array:
  """KL at each position [B, T]: full for teacher logits [B, T, V], top-k for a `TeacherTopK`."""
  if isinstance(teacher, TeacherTopK):
    return kl_topk(teacher, student_logits, temperature)
  return kl_full(teacher, student_logits, temperature)


def forward_kl(teacher: jax.Array | TeacherTopK, student_logits: jax.Array,
               mask: jax.Array | None = None, temperature: float = 1.0
               ) -> tuple[jax.Array, jax.Array]:
  """(τ² · mean KL over the positions with mask 1, their count); mask [B, T] or None (all)."""
  if temperature <= 0:
    raise ValueError(f"distillation temperature must be > 0, got {temperature}")
  kl = per_position_kl(teacher, student_logits, temperature)             # [B, T]
  m = jnp.ones(kl.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
  n = jnp.sum(m)
  return temperature ** 2 * jnp.sum(kl * m) / jnp.maximum(n, 1.0), n
