"""Attention by blocks of queries (`attention._query_blocks`): what long training and prefill
attentions compute, against one plain [B, H, T, S] softmax attention written out here, forward
and gradients, for the expanded and the absorbed forms, with padding and packed segments; and
no token ever sees a later one without a cache, whatever the positions say."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax import get_preset
from deepseek_jax.attention import MLAttention, _query_blocks, attention_mask

CFG = get_preset("tiny_v3")


@pytest.mark.parametrize("t", [1, 7, 128, 129, 300, 1000, 5000])
def test_query_blocks_cover_the_queries_in_order(t):
  blocks = _query_blocks(t, t, causal=True)
  assert blocks[0][0] == 0 and blocks[-1][1] == t
  assert all(b0[1] == b1[0] for b0, b1 in zip(blocks, blocks[1:]))
  assert all(end == b for _, b, end in blocks)  # causal: the keys up to the block's last query
  assert len(blocks) == 1 if t <= 128 else 4 <= len(blocks) <= 16
  assert all(end == t + 5 for *_, end in _query_blocks(t, t + 5, causal=False))


def _plain(attn, q_nope, q_pe, c_kv, k_pe, mask):
  """Expanded MLA written out: every head's keys and values, one [B, H, T, S] softmax."""
  cfg = attn.cfg
  kv = (c_kv @ attn.kv_b_proj.merged_kernel()).reshape(*c_kv.shape[:2], cfg.num_attention_heads, -1)
  k_nope, v = kv[..., :cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim:]
  scores = (jnp.einsum("bthn,bshn->bhts", q_nope, k_nope)
            + jnp.einsum("bthr,bsr->bhts", q_pe, k_pe)) * cfg.softmax_scale
  probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
  return jnp.einsum("bhts,bshv->bthv", probs, v)


def _inputs(b, t, seed=0):
  r = np.random.RandomState(seed)
  h = CFG.num_attention_heads
  shapes = [(b, t, h, CFG.qk_nope_head_dim), (b, t, h, CFG.qk_rope_head_dim),
            (b, t, CFG.kv_lora_rank), (b, t, CFG.qk_rope_head_dim)]
  return [jnp.asarray(r.randn(*s).astype(np.float32)) for s in shapes]


@pytest.mark.parametrize("absorb", [False, True], ids=["expanded", "absorbed"])
def test_blocks_equal_one_plain_attention_forward_and_gradients(absorb):
  b, t = 2, 300  # four blocks of 80, 80, 80 and 60 queries
  attn = MLAttention(CFG, rngs=nnx.Rngs(0))
  # sequence 0: two packed segments; sequence 1: one, its last 37 tokens padding
  seg = np.zeros((b, t), np.int32)
  seg[0, 170:] = 1
  pos = np.stack([np.where(seg[0] == 0, np.arange(t), np.arange(t) - 170), np.arange(t)])
  valid = np.ones((b, t), bool)
  valid[1, t - 37:] = False
  mask = attention_mask(jnp.asarray(pos), jnp.asarray(pos), jnp.asarray(valid), jnp.asarray(seg),
                        jnp.asarray(seg))
  tril = jnp.tril(jnp.ones((t, t), bool))
  xs = _inputs(b, t)
  attend = attn.attend_absorbed if absorb else attn.attend_expanded
  cot = jnp.asarray(np.random.RandomState(1).randn(b, t, CFG.num_attention_heads,
                                                   CFG.v_head_dim).astype(np.float32))

  def loss(f, *xs):
    return jnp.sum(f(*xs) * cot)

  def both(f):
    return jax.jit(lambda *a: (f(*a), jax.value_and_grad(lambda *a: loss(f, *a),
                                                          argnums=(0, 1, 2, 3))(*a)))(*xs)

  out, (got, got_g) = both(lambda *x: attend(*x, mask, causal=True))
  ref, (want, want_g) = both(lambda *x: _plain(attn, *x, mask & tril))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  for g, w in zip(got_g, want_g):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("absorb", [False, True], ids=["expanded", "absorbed"])
def test_no_token_sees_a_later_one_without_a_cache(absorb):
  """Positions all 0 (e.g. padding placed at position 0) would let every token see every other
  by position alone; by index (transformers' causal mask) token t sees tokens 0..t only, in one
  block and across blocks."""
  b, t = 1, 200
  attn = MLAttention(CFG, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.RandomState(2).randn(b, t, CFG.hidden_size).astype(np.float32))
  pos = jnp.zeros((b, t), jnp.int32)
  run = nnx.jit(lambda m, x, pos: m(x, pos, absorb=absorb)[0])
  out = run(attn, x, pos)
  changed = run(attn, x.at[:, 150:].set(0.0), pos)
  np.testing.assert_array_equal(np.asarray(out[:, :150]), np.asarray(changed[:, :150]))
  assert not np.allclose(np.asarray(out[:, 150:]), np.asarray(changed[:, 150:]))
  short = run(attn, x[:, :20], pos[:, :20])  # one block
  np.testing.assert_allclose(np.asarray(short), np.asarray(out[:, :20]), atol=1e-5, rtol=1e-5)
