"""The jitted train step: gradient accumulation, MTP with λ = 0, bias balancing, bias mapping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from deepseek_jax import get_preset, optim
from deepseek_jax.model import DeepseekForCausalLM
from deepseek_jax.moe import RouterBias
from deepseek_jax.params import flat_state, model_from_flat
from deepseek_jax.train_config import TrainConfig
from deepseek_jax.train_step import make_train_step, update_router_biases

T = 16


def _setup(cfg, tc, tx=None, model=None):
  model = model or DeepseekForCausalLM(cfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = tx or optim.make_optimizer(tc.optim_config())
  state = {"params": params, "rest": rest, "opt_state": tx.init(params),
           "step": jnp.zeros((), jnp.int32)}
  return jax.jit(make_train_step(graphdef, tx, cfg, tc)), state


def _tokens(n, seed=0, vocab=259):
  return np.random.default_rng(seed).integers(0, vocab, (n, T + 1)).astype(np.int32)


def test_grad_accumulation_equals_one_big_batch():
  cfg = get_preset("tiny_v3", moe_dispatch="dense")
  tc = TrainConfig(seq_aux_alpha=1e-2, bias_update_speed=0.01)
  tokens = _tokens(4)
  out = {}
  for accum in (1, 4):
    # SGD with step 1: the parameter change is the gradient itself
    step, state = _setup(cfg, tc, tx=optax.sgd(1.0))
    before = jax.tree.map(np.asarray, state["params"])
    state, logs = step(state, jnp.asarray(tokens.reshape(accum, 4 // accum, T + 1)))
    grads = jax.tree.map(lambda a, b: a - np.asarray(b), before, state["params"])
    out[accum] = (grads, jax.device_get(logs), jax.tree.map(np.asarray, state["rest"]))
  for accum in (4,):
    # atol: one float32 rounding of a unit-size parameter (norm scales) in before - after
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=3e-7),
                 out[1][0], out[accum][0])
    for k in ("loss", "mtp_loss", "aux_loss", "grad_norm"):
      np.testing.assert_allclose(out[1][1][k], out[accum][1][k], rtol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, out[1][2], out[accum][2])  # same counts


def test_mtp_weight_zero_equals_model_without_mtp():
  cfg = get_preset("tiny_v3", moe_dispatch="dense")
  tc = TrainConfig(mtp_weight=0.0, seq_aux_alpha=1e-2, learning_rate=1e-2, warmup_steps=0)
  with_mtp = DeepseekForCausalLM(cfg, rngs=nnx.Rngs(0))
  flat = {k: v for k, v in flat_state(with_mtp).items() if not k.startswith("mtp.")}
  cfg0 = cfg.replace(num_nextn_predict_layers=0)
  without = model_from_flat(cfg0, flat)
  step_a, state_a = _setup(cfg, tc, model=with_mtp)
  step_b, state_b = _setup(cfg0, tc, model=without)
  for i in range(3):
    batch = jnp.asarray(_tokens(2, seed=i)[None])
    state_a, logs_a = step_a(state_a, batch)
    state_b, logs_b = step_b(state_b, batch)
    assert float(logs_a["mtp_loss"]) > 0  # computed and logged, weighted by zero
    np.testing.assert_allclose(logs_a["loss"], logs_b["loss"], rtol=1e-6)
  main_a = dict(nnx.to_flat_state(state_a["params"]))
  main_b = dict(nnx.to_flat_state(state_b["params"]))
  # Equal up to float rounding: ~1e-7 everywhere, but Adam divides by sqrt(v) + 1e-8, so where a
  # gradient is near 1e-8 (a rarely seen embedding row) rounding moves a parameter by up to ~2e-5
  # (lr 1e-2); an MTP loss leaking through its zero weight would move parameters by ~lr.
  for k, v in main_b.items():
    np.testing.assert_allclose(main_a[k][...], v[...], rtol=1e-5, atol=1e-4, err_msg=str(k))


def _favour_expert0(state, amount):
  def bump(path, leaf):
    if "e_score_correction_bias" in jax.tree_util.keystr(path):
      return leaf.at[..., 0].add(amount)
    return leaf
  state["rest"] = jax.tree_util.tree_map_with_path(bump, state["rest"])
  return state


def test_bias_updates_balance_a_router_favouring_one_expert():
  cfg = get_preset("tiny_v3", moe_dispatch="dense")
  # learning rate 0: only the router biases move, so any change in balance is the rule's alone
  tc = TrainConfig(seq_aux_alpha=0.0, bias_update_speed=0.005, learning_rate=0.0,
                           warmup_steps=0)
  step, state = _setup(cfg, tc)
  state = _favour_expert0(state, 0.1)  # ~2.5 standard deviations of the initial scores
  trace = []
  for i in range(40):
    state, logs = step(state, jnp.asarray(_tokens(8, seed=i)[None]))
    trace.append(np.asarray(logs["load_cv"]))
  cv = np.stack(trace)                                                   # [steps, routers]
  start, end = cv[:3].mean(0), cv[-10:].mean(0)
  assert cv.shape[1] == 3                        # two MoE layers and the MTP block
  # 16 experts, top-4: unbiased cv ~0.27; favoured ~0.65 (0.78 if expert 0 were always chosen)
  assert (start > 0.55).all(), start
  assert (end < 0.5 * start).all(), (start, end)  # seen: ~0.27, back to unbiased
  bias = [np.asarray(l) for p, l in jax.tree_util.tree_leaves_with_path(state["rest"])
          if "e_score_correction_bias" in jax.tree_util.keystr(p)]
  assert all(b[0] < 0.1 - 0.005 * 10 for b in bias)  # the favoured expert was lowered


def test_update_router_biases_maps_stacked_layers_then_mtp():
  """Chosen by variable type (RouterBias), whatever the names: other variables stay."""
  e = 4
  rest = {"moe_layers": {"gate": {"anything": RouterBias(jnp.zeros((2, e)))}},
          "mtp": {0: {"gate": {"e_score_correction_bias": RouterBias(jnp.zeros((e,)))}}},
          "other": {"e_score_correction_bias": nnx.Variable(jnp.ones((e,)))}}
  counts = jnp.asarray([[4, 0, 0, 0], [0, 4, 0, 0], [0, 0, 0, 4]], jnp.float32)
  new = update_router_biases(rest, counts, 0.1)
  np.testing.assert_allclose(new["moe_layers"]["gate"]["anything"][...],
                             [[-0.1, 0.1, 0.1, 0.1], [0.1, -0.1, 0.1, 0.1]])
  np.testing.assert_allclose(new["mtp"][0]["gate"]["e_score_correction_bias"][...],
                             [0.1, 0.1, 0.1, -0.1])
  np.testing.assert_array_equal(new["other"]["e_score_correction_bias"][...], 1.0)
  assert isinstance(new["mtp"][0]["gate"]["e_score_correction_bias"], RouterBias)
  with pytest.raises(ValueError, match="3 biases for 2 routers"):
    update_router_biases(rest, counts[:2], 0.1)


@pytest.fixture(scope="module")
def baseline_step():
  cfg = get_preset("tiny_v3", moe_dispatch="dense")
  tc = TrainConfig(learning_rate=1e-2, warmup_steps=0)
  step, state = _setup(cfg, tc)
  state, logs = step(state, jnp.asarray(_tokens(2)[None]))
  return cfg, tc, jax.device_get(logs), jax.tree.map(np.asarray, state["params"])


@pytest.mark.parametrize("variant", ["remat", "bfloat16"])
def test_remat_and_bf16_compute_follow_the_float32_step(baseline_step, variant):
  cfg, tc, logs0, params0 = baseline_step
  dtype = jnp.bfloat16 if variant == "bfloat16" else jnp.float32
  cfg = cfg.replace(remat=variant == "remat")
  model = DeepseekForCausalLM(cfg, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  step, state = _setup(cfg, tc, model=model)
  state, logs = step(state, jnp.asarray(_tokens(2)[None]))
  leaves = jax.tree.leaves(state["params"])
  assert all(l.dtype == jnp.float32 for l in leaves)  # float32 master weights either way
  if variant == "remat":  # the same computation, recomputed: equal up to float reassociation
    np.testing.assert_allclose(logs["loss"], logs0["loss"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 jax.tree.map(np.asarray, state["params"]), params0)
  else:
    np.testing.assert_allclose(logs["loss"], logs0["loss"], rtol=2e-2)
    assert np.isfinite(float(logs["grad_norm"]))
