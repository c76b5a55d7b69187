"""Self-speculative decoding with the MTP head: greedy outputs identical to plain greedy decoding."""

import numpy as np
import pytest
from flax import nnx

from deepseek_jax import get_preset
from deepseek_jax.generation import Generation, generate
from deepseek_jax.model import DeepseekForCausalLM
from deepseek_jax.params import flat_state, model_from_flat

CFG = get_preset("tiny_v3")  # one MTP depth
PROMPTS = [[5, 17, 300, 42, 9, 250, 3], [77, 12], [400, 401, 2, 88, 90, 91, 92, 93, 94, 95, 96]]
NEW = 16


@pytest.fixture(scope="module")
def random_weights():
  """Every weight random (std 0.08): the MTP head's drafts are almost always rejected."""
  flat = flat_state(DeepseekForCausalLM(CFG, rngs=nnx.Rngs(0)))
  rng = np.random.RandomState(0)
  return {k: (np.asarray(v) if "norm" in k or k.endswith("e_score_correction_bias")
              else rng.randn(*v.shape).astype(np.float32) * 0.08) for k, v in flat.items()}


def drafter_weights(weights, residual_scale=6.0, seed=1):
  """A model whose MTP head often guesses right, so both branches (accept, reject) run.

  The head maps the embedding of token x to the logits of perm(x); the MTP block passes the
  embedding of its input token through (eh_proj = [I; 0], attention and MLP outputs zeroed), so
  it drafts perm(next token). The main layers' outputs (scaled by `residual_scale`) make the main
  model deviate from perm now and then, and those drafts are rejected.
  """
  rng = np.random.RandomState(seed)
  w, d = dict(weights), CFG.hidden_size
  emb = rng.randn(CFG.vocab_size, d).astype(np.float32)
  perm = rng.permutation(CFG.vocab_size)
  w["embed_tokens.embedding"] = emb
  w["lm_head.kernel"] = np.ascontiguousarray(emb[np.argsort(perm)].T)  # [D, V]
  for k in w:
    if k.endswith("o_proj.kernel") or "down_proj" in k:
      w[k] = w[k] * (0.0 if k.startswith("mtp.") else residual_scale)
  w["mtp.0.eh_proj.kernel"] = np.concatenate([np.eye(d), np.zeros((d, d))]).astype(np.float32)
  return w


def _speculate(model, steps=None, **kw):
  g = Generation(model, PROMPTS, NEW, speculative=True, **kw)
  g.prefill()
  if steps is None:
    g.decode()
  while not g.finished:
    g.decode(steps)
  return g


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_equals_plain_greedy_random_mtp(random_weights, scan):
  model = model_from_flat(CFG.replace(scan_layers=scan), random_weights)
  plain = generate(model, PROMPTS, NEW, eos_id=-1)
  g = _speculate(model, eos_id=-1)
  assert g.results() == plain
  assert g.acceptance() < 0.2  # random drafts


def test_equals_plain_greedy_with_accepted_drafts(random_weights):
  model = model_from_flat(CFG, drafter_weights(random_weights))
  plain = generate(model, PROMPTS, NEW, eos_id=-1)
  g = _speculate(model, eos_id=-1)
  assert g.results() == plain
  assert 0.2 < g.acceptance() < 0.95  # both branches taken
  assert int(g.carry.step) < NEW - 1  # fewer loop steps than plain decoding's NEW - 1
  # streamed in chunks of 3 loop steps: same tokens
  assert _speculate(model, steps=3, eos_id=-1).results() == plain
  # an EOS met inside an accepted pair (first or second of the two) stops at the EOS
  for eos in {plain[0][5], plain[1][3], plain[2][10]}:
    expect = [r[:r.index(eos) + 1] if eos in r else r for r in plain]
    assert generate(model, PROMPTS, NEW, eos_id=eos) == expect
    assert _speculate(model, eos_id=eos).results() == expect


def test_max_new_tokens_is_exact(random_weights):
  model = model_from_flat(CFG, drafter_weights(random_weights, residual_scale=0.0))
  for n in (1, 2, 5):  # all drafts accepted: 2 tokens a step must not overshoot
    g = Generation(model, PROMPTS, n, speculative=True, eos_id=-1)
    g.prefill()
    g.decode()
    assert g.results() == generate(model, PROMPTS, n, eos_id=-1)
    assert [len(r) for r in g.results()] == [n] * len(PROMPTS)
