"""The RL sampler against the learner: log-probabilities of the sampled tokens recomputed by the
learner (absorbed and expanded attention), one prefill per group, EOS and length stops, routing
replay, and the reference as the base with LoRA switched off."""

import jax
import numpy as np
import pytest
from flax import nnx

from deepseek_jax import adapters, get_preset, grpo_step
from deepseek_jax.generation import Generation, generate
from deepseek_jax.model import DeepseekForCausalLM
from deepseek_jax.sampling import SamplingParams

PROMPTS = [[5, 17, 300, 42, 9, 250, 3], [77, 12], [400, 401, 2, 88, 90]]
G, NEW = 3, 9
SAMPLING = SamplingParams(1.0, None, 0.9)


@pytest.fixture(scope="module")
def model():
  return DeepseekForCausalLM(get_preset("tiny_v3", moe_dispatch="dense"), rngs=nnx.Rngs(1))


def _rollout(model, *, absorb=None, eos_id=-1, seed=0, **kw):
  g = Generation(model, PROMPTS, NEW, temperature=SAMPLING.temperature, top_p=SAMPLING.top_p,
                 seed=seed, eos_id=eos_id, absorb=absorb, num_samples=G, return_logprobs=True,
                 record_routing=True, **kw)
  g.prefill()
  g.decode()
  return g


@pytest.fixture(scope="module")
def rollouts(model):
  return {absorb: _rollout(model, absorb=absorb) for absorb in (None, False)}


def _learner(model, batch, replay=False):
  fn = jax.jit(lambda b: grpo_step.policy_logprobs(model, b, SAMPLING, replay=replay))
  logp, _, router = fn(batch)
  return np.asarray(logp), router


@pytest.mark.parametrize("absorb", [None, False], ids=["absorbed-decode", "expanded"])
def test_sampler_logprobs_equal_the_learners(model, rollouts, absorb):
  g = rollouts[absorb]
  roll = g.arrays()
  assert g.tokens.shape[0] == len(PROMPTS)              # the prefill ran on the P prompts ...
  assert roll["tokens"].shape[0] == len(PROMPTS) * G    # ... and G rows decoded from each
  batch = grpo_step.learner_batch(roll, np.zeros(len(PROMPTS) * G), G, routing_replay=True)
  m = batch["mask"] > 0
  assert m.sum() == roll["counts"].sum() == len(PROMPTS) * G * NEW
  for replay in (False, True):
    logp, _ = _learner(model, batch, replay)
    np.testing.assert_allclose(logp[m], batch["old_logp"][m], atol=1e-4)


def test_generate_contract_and_group_rows(model, rollouts):
  """generate(..., return_logprobs=True) -> (tokens, logprobs); a group's rows are copies of one
  prefill (greedy: the same text as the prompt alone) that differ in their noise."""
  roll = rollouts[None].arrays()
  tokens, lps = generate(model, PROMPTS, NEW, temperature=1.0, top_p=0.9, seed=0, eos_id=-1,
                         num_samples=G, return_logprobs=True)
  assert tokens == [list(r[:c]) for r, c in zip(roll["tokens"], roll["counts"])]
  np.testing.assert_allclose(np.concatenate(lps), roll["logprobs"][:, :NEW].ravel(), atol=1e-6)
  assert all(lp <= 0 for row in lps for lp in row)
  assert len(set(map(tuple, tokens))) == len(tokens)  # G different samples of each prompt
  greedy = generate(model, PROMPTS, NEW, eos_id=-1, num_samples=G)
  plain = generate(model, PROMPTS, NEW, eos_id=-1)
  for p in range(len(PROMPTS)):
    assert greedy[p * G:(p + 1) * G] == [plain[p]] * G


def test_eos_and_length_stops_and_the_learner_batch_layout(model, rollouts):
  first = rollouts[None].arrays()
  eos = int(first["tokens"][0, 3])                    # a token the first sample emits mid-way
  g = _rollout(model, eos_id=eos)
  roll = g.arrays()
  counts = roll["counts"]
  assert counts[0] <= 4 and roll["eos"][0] and counts.max() <= NEW
  for r, c, stopped in zip(roll["tokens"], counts, roll["eos"]):
    assert (r[c:] == 0).all()
    assert stopped == (r[c - 1] == eos)
    assert stopped or c == NEW                        # a sequence without EOS ran to the limit
    assert eos not in r[:c - 1]
  batch = grpo_step.learner_batch(roll, np.arange(len(counts), dtype=np.float32), G)
  for b in range(len(counts)):
    p = PROMPTS[b // G]
    n = counts[b]
    row = batch["tokens"][b]
    assert row[:len(p)].tolist() == p and row[len(p):len(p) + n].tolist() == roll["tokens"][b, :n].tolist()
    assert (row[len(p) + n:] == 0).all()
    want = np.zeros(row.shape[0] - 1)
    want[len(p) - 1:len(p) - 1 + n] = 1
    np.testing.assert_array_equal(batch["mask"][b], want)
    np.testing.assert_allclose(batch["old_logp"][b][want > 0], roll["logprobs"][b, :n])
  assert batch["tokens"].shape[1] % grpo_step.LENGTH_MULTIPLE == 0
  r = np.arange(len(counts), dtype=np.float32).reshape(-1, G)
  want = ((r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-4)).ravel()
  np.testing.assert_allclose(batch["advantages"], want, rtol=1e-5)


def test_routing_replay_reuses_the_sampled_experts(model, rollouts):
  roll = rollouts[None].arrays()
  batch = grpo_step.learner_batch(roll, np.zeros(len(roll["counts"])), G, routing_replay=True)
  m = batch["mask"] > 0
  fed = m.copy()  # inputs whose experts the sampler recorded: the prompt and the fed tokens
  for b, p in enumerate(PROMPTS[i // G] for i in range(len(roll["counts"]))):
    fed[b, :len(p)] = True
  _, own = _learner(model, batch)
  for rec, r in zip(batch["routes"], own):
    np.testing.assert_array_equal(rec[fed], np.asarray(r.topk_idx)[fed])
  # another router now: without replay the learner picks other experts, with replay the sampled
  other = nnx.clone(model)
  for i, layer in enumerate(other.layers):
    if layer.is_moe:
      k = layer.mlp.gate.kernel
      k[...] = jax.random.normal(jax.random.key(i), k.shape) * 0.1
  _, free = _learner(other, batch)
  _, replayed = _learner(other, batch, replay=True)
  assert any((np.asarray(r.topk_idx)[fed] != rec[fed]).any() for r, rec in zip(free, batch["routes"]))
  for rec, r in zip(batch["routes"], replayed):
    np.testing.assert_array_equal(np.asarray(r.topk_idx)[fed], rec[fed])


def test_reference_is_the_base_with_lora_switched_off(model, rollouts):
  lora = adapters.with_adapters(model, rank=4, seed=2)
  gd, params, frozen, rest = nnx.split(lora, adapters.LoRAParam, nnx.Param, ...)
  params = jax.tree.map(lambda a: a + 0.05, params)  # a trained adapter
  trained = nnx.merge(gd, params, frozen, rest)
  roll = rollouts[None].arrays()
  batch = grpo_step.learner_batch(roll, np.zeros(len(roll["counts"])), G)
  ref_fn = jax.jit(grpo_step.make_reference_fn(gd, SAMPLING, lora=True, replay=False))
  ref = np.asarray(ref_fn({"params": params, "frozen": frozen, "rest": rest}, batch))
  base, _ = _learner(model, batch)
  policy, _ = _learner(trained, batch)
  m = batch["mask"] > 0
  # the base model (up to XLA's fusion of the zeroed adapters' terms; -inf where the trained
  # policy's sample is outside the base's top-p set)
  np.testing.assert_allclose(ref[m], base[m], rtol=0, atol=2e-6)
  assert np.abs(policy[m] - base[m]).max() > 1e-3       # and not the policy
