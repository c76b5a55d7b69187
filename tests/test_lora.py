"""LoRA adapters: a fresh adapter changes nothing, only adapters train, merging keeps the outputs,
routed-expert adapters go through every dispatch path, save/load, and the memory plan."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax import adapters, dispatch, get_preset, optim
from deepseek_jax.layers import LoRAParam
from deepseek_jax.model import DeepseekForCausalLM
from deepseek_jax.params import flat_state, model_from_flat
from deepseek_jax.train_config import TrainConfig
from deepseek_jax.train_step import make_train_step

E, D, I, R = 6, 16, 12, 3


def _ids(cfg, shape=(2, 9), seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(0, cfg.vocab_size, shape), jnp.int32)


def _perturbed(model, seed=1, scale=0.05):
  """The model with random adapters (as after training): B no longer zero."""
  state = nnx.state(model, LoRAParam)
  keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state))))
  nnx.update(model, jax.tree.map(lambda x: x + scale * jax.random.normal(next(keys), x.shape),
                                 state))
  return model


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scanned"])
def base(request):
  cfg = get_preset("tiny_v3", moe_dispatch="dense", scan_layers=request.param)
  return DeepseekForCausalLM(cfg, rngs=nnx.Rngs(0))


def test_fresh_adapters_leave_the_model_unchanged_and_merging_keeps_outputs(base):
  ids = _ids(base.cfg)
  lora = adapters.with_adapters(base, rank=4, seed=3)
  # B = 0: the adapters add exact zeros; XLA may still pick another kernel for a projection
  # whose output gains that term (1 ulp apart, scanned, with jax 0.12 on an AVX2 host)
  np.testing.assert_allclose(np.asarray(lora(ids)), np.asarray(base(ids)), rtol=1e-6, atol=1e-6)
  paths = "\n".join(adapters.adapter_state(lora))
  for adapted in ("self_attn.q_a_proj.lora_a", "self_attn.kv_b_proj.lora_b", "self_attn.o_proj",
                  "mlp.gate_proj.lora_a", "shared_experts.down_proj.lora_b",
                  "experts.up_proj_lora_a", "experts.down_proj_lora_b"):
    assert adapted in paths, adapted
  out = _perturbed(lora)(ids)
  assert float(jnp.max(jnp.abs(out - base(ids)))) > 1e-3
  merged = adapters.merge_adapters(lora)
  assert merged.cfg.lora_rank == 0 and not adapters.adapter_state(merged)
  np.testing.assert_allclose(np.asarray(merged(ids)), np.asarray(out), atol=1e-5, rtol=1e-5)


def test_targets_choose_the_projections():
  cfg = get_preset("tiny_v3")
  base = DeepseekForCausalLM(cfg, rngs=nnx.Rngs(0))
  only_experts = adapters.with_adapters(base, rank=2, targets=("mlp.experts",))
  paths = set(adapters.adapter_state(only_experts))
  assert paths and all(".mlp.experts." in p for p in paths)
  attn = adapters.with_adapters(base, rank=2, targets=("self_attn.*",))
  assert all(".self_attn." in p for p in adapters.adapter_state(attn))
  assert not any("gate.kernel" in p for p in adapters.adapter_state(
      adapters.with_adapters(base, rank=2)))  # the router never gets one


def test_only_adapters_have_gradients_and_optimizer_state():
  cfg = get_preset("tiny_v3", moe_dispatch="dense", scan_layers=True, remat=True)
  model = adapters.with_adapters(DeepseekForCausalLM(cfg, rngs=nnx.Rngs(0)), rank=4)
  graphdef, params, frozen, rest = nnx.split(model, LoRAParam, nnx.Param, ...)
  tx = optim.make_optimizer(TrainConfig(learning_rate=1e-2, warmup_steps=0).optim_config())
  state = {"params": params, "frozen": frozen, "rest": rest, "opt_state": tx.init(params),
           "step": jnp.zeros((), jnp.int32)}
  n_adapter = sum(x.size for x in jax.tree.leaves(params))
  n_moments = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim)
  assert n_moments == 2 * n_adapter  # AdamW's two moments, for the adapters alone
  before = jax.tree.map(np.asarray, frozen)
  step = jax.jit(make_train_step(graphdef, tx, model.cfg, TrainConfig(learning_rate=1e-2,
                                                                       warmup_steps=0)))
  tokens = _ids(cfg, (1, 2, 17))
  state, logs = step(state, tokens)
  assert float(logs["grad_norm"]) > 0
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state["frozen"]), before)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                       state["params"], params))
  assert max(moved) > 0


def _expert_weights(seed=0, lora=True):
  r = np.random.RandomState(seed)
  out = []
  for k, n in ((D, I), (D, I), (I, D)):
    w = jnp.asarray(r.randn(E, k, n) * 0.3, jnp.float32)
    a = jnp.asarray(r.randn(E, k, R) * 0.3, jnp.float32) if lora else None
    b = jnp.asarray(r.randn(E, R, n) * 0.3, jnp.float32) if lora else None
    out.append(dispatch.ExpertWeights(w, a, b))
  return out


def _loop_reference(x, idx, weight, ws):
  """Token by token, expert by expert: y_n = sum_k w_nk · down(silu(gate x) * up x), each
  projection W_e + A_e B_e."""
  merged = [p.w + p.a @ p.b for p in ws]
  rows = []
  for n in range(x.shape[0]):
    y = 0.0
    for k in range(idx.shape[1]):
      e = int(idx[n, k])
      h = jax.nn.silu(x[n] @ merged[0][e]) * (x[n] @ merged[1][e])
      y = y + weight[n, k] * (h @ merged[2][e])
    rows.append(y)
  return jnp.stack(rows)


@pytest.mark.parametrize("method", ["dense", "ragged", "blocked", "capacity", "native", "pallas"])
@pytest.mark.parametrize("n", [3, 40], ids=["few_copies", "many_copies"])
def test_expert_adapters_in_every_dispatch_path_equal_a_loop(method, n):
  r = np.random.RandomState(n)
  x = jnp.asarray(r.randn(n, D), jnp.float32)
  idx = jnp.asarray(np.stack([r.choice(E, 2, replace=False) for _ in range(n)]), jnp.int32)
  weight = jnp.asarray(r.rand(n, 2), jnp.float32)
  ws = _expert_weights()
  got = dispatch.moe_experts(x, idx, weight, *ws, method=method, tile=8)
  np.testing.assert_allclose(np.asarray(got), np.asarray(_loop_reference(x, idx, weight, ws)),
                             atol=1e-4, rtol=1e-4)

  def loss(f):
    return lambda ws: jnp.sum(jnp.sin(f(ws)))
  g = jax.grad(loss(lambda ws: dispatch.moe_experts(x, idx, weight, *ws, method=method,
                                                     tile=8)))(ws)
  g_ref = jax.grad(loss(lambda ws: _loop_reference(x, idx, weight, ws)))(ws)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4, rtol=2e-4)


def test_expert_adapters_through_capacity_overflow_equal_a_loop():
  """Every copy on experts 0 and 1: beyond their slots, `capacity` runs the copies through its
  overflow tiles, adapters included (forward and the adapters' gradients)."""
  n = 40
  r = np.random.RandomState(7)
  x = jnp.asarray(r.randn(n, D), jnp.float32)
  idx = jnp.asarray(np.tile([0, 1], (n, 1)), jnp.int32)
  assert n > dispatch.capacity(2 * n, E)  # experts 0 and 1 overflow their slots
  weight = jnp.asarray(r.rand(n, 2), jnp.float32)
  ws = _expert_weights(3)
  run = jax.jit(lambda ws: dispatch.moe_experts(x, idx, weight, *ws, method="capacity"))
  np.testing.assert_allclose(np.asarray(run(ws)),
                             np.asarray(_loop_reference(x, idx, weight, ws)), atol=1e-4, rtol=1e-4)
  g = jax.jit(jax.grad(lambda ws: jnp.sum(jnp.sin(run(ws)))))(ws)
  g_ref = jax.grad(lambda ws: jnp.sum(jnp.sin(_loop_reference(x, idx, weight, ws))))(ws)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4, rtol=2e-4)


def test_save_and_load_adapters_alone(tmp_path):
  cfg = get_preset("tiny_v3", moe_dispatch="dense")
  base = DeepseekForCausalLM(cfg, rngs=nnx.Rngs(0))
  lora = _perturbed(adapters.with_adapters(base, rank=4))
  adapters.save_adapters(lora, tmp_path / "ad", base_path="/somewhere")
  meta = adapters.read_adapter_config(tmp_path / "ad")
  assert meta["lora_rank"] == 4 and meta["base_model_path"] == "/somewhere"
  back = adapters.load_adapters(base, tmp_path / "ad")
  ids = _ids(cfg)
  np.testing.assert_array_equal(np.asarray(back(ids)), np.asarray(lora(ids)))
  scanned_base = model_from_flat(cfg.replace(scan_layers=True), flat_state(base))
  scanned = adapters.load_adapters(scanned_base, tmp_path / "ad")
  np.testing.assert_allclose(np.asarray(scanned(ids)), np.asarray(lora(ids)), atol=1e-6)
  with pytest.raises(ValueError, match="no LoRA adapters"):
    adapters.save_adapters(base, tmp_path / "none")


def test_adapter_checkpoint_is_a_few_percent_of_the_base(tmp_path):
  """Rank 8 on every projection is at most 5% of the base in bytes, on a config whose widths are
  those of a real model's order (hidden 1024, expert width 512); on tiny_v3 (hidden 64) rank 8
  is an eighth of the width, so there the ratio is far above."""
  from deepseek_jax import checkpoint
  cfg = get_preset("tiny_v3", hidden_size=1024, moe_intermediate_size=512, intermediate_size=1024,
                   q_lora_rank=256, kv_lora_rank=128, num_hidden_layers=2, n_routed_experts=8,
                   num_nextn_predict_layers=0, vocab_size=1024)
  base = DeepseekForCausalLM(cfg, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  lora = adapters.with_adapters(base, rank=8)
  checkpoint.save_params(tmp_path / "base", cfg, flat_state(base))
  adapters.save_adapters(lora, tmp_path / "ad")

  def size(d):
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
  ratio = size(tmp_path / "ad") / size(tmp_path / "base")
  assert ratio <= 0.05, ratio


def test_memory_plan_counts_adapters_and_quantized_bases():
  from deepseek_jax.sharding import memory_plan
  lite = get_preset("deepseek_v2_lite")
  full = memory_plan(lite, {"fsdp": 8}, batch=8, seq_len=4096, training=True)
  lora = memory_plan(lite, {"fsdp": 8}, batch=8, seq_len=4096, training=True, lora_rank=16)
  int8 = memory_plan(lite, {"fsdp": 8}, batch=8, seq_len=4096, training=True, lora_rank=16,
                     weight_quant="int8")
  # adapters (float32) on every projection: B [r, out] is not split over fsdp, as its weight's
  # rows are not; still a small fraction of full training's state
  assert lora.optimizer < full.optimizer / 10 and lora.gradients < full.gradients / 5
  assert int8.params < 0.6 * lora.params
  assert int8.fits("v5e") and not full.fits("v5e")
  one = memory_plan(lite, {}, batch=1, seq_len=4096, training=True, lora_rank=16,
                    weight_quant="int8")
  assert one.fits("h100")


def test_adapters_on_a_mesh_follow_their_weights_and_train_like_one_device():
  from sharding_worker import run as run_worker
  (r,) = run_worker("lora")
  assert r["wrong"] == [] and r["adapters"] > 20, r
  assert r["expert_adapter_shard"][1] * 4 == r["expert_adapter_shape"][1]  # [L, E/4, D/2, r]
  # Adam's first step is about lr * g / |g|: float32 sums reordered across the shards move an
  # adapter entry whose gradient is near zero by up to ~2e-5 (measured on tiny_v3, 16 experts)
  assert abs(r["loss"] - r["ref_loss"]) < 1e-5 and r["param_diff"] < 1e-4, r
