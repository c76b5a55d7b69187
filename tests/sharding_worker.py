"""Subprocess worker for the sharding tests (8 host CPU devices, or one of two processes).

  python tests/sharding_worker.py models  MESHES_JSON      # sharded vs one device, several meshes
  python tests/sharding_worker.py ep                       # expert_parallel_moe vs dense
  python tests/sharding_worker.py step PROCESS_ID N PORT   # one training step's loss (N processes)
  python tests/sharding_worker.py pretrained HF_DIR ORBAX_DIR WORKDIR  # from_pretrained(mesh=)

Prints one JSON object per line; the tests read them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run(*args: str, devices: int = 8, timeout: int = 900) -> list[dict]:
  """Runs this worker with `devices` host CPU devices; its JSON lines (tests call this)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=xla_flags(devices))
  out = subprocess.run([sys.executable, os.path.abspath(__file__), *args], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stderr[-4000:]
  return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _setup(cfg_overrides=None):
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from deepseek_jax import get_preset
  from deepseek_jax.model import DeepseekForCausalLM
  from deepseek_jax.train_config import TrainConfig
  from deepseek_jax.train_step import make_loss_fn
  cfg = get_preset("tiny_v3", num_hidden_layers=2, **(cfg_overrides or {}))
  model = DeepseekForCausalLM(cfg, rngs=nnx.Rngs(0))
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 17)).astype(np.int32)
  tc = TrainConfig(preset="tiny_v3")
  return cfg, model, jnp.asarray(tokens), tc, make_loss_fn


def _logits_loss_and_grads(model, tokens, cfg, tc, make_loss_fn):
  """Logits on tokens[:, :-1], the training loss and its gradients, from one compiled program."""
  import jax
  from flax import nnx
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # Router biases differentiated too (as the trainer does: nnx.scan needs them traced alike).
  vg = jax.value_and_grad(make_loss_fn(graphdef, cfg, tc), argnums=(0, 1), has_aux=True)

  def run(params, rest, tokens):
    logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
    (loss, _), (grads, _) = vg(params, rest, tokens)
    return logits, loss, grads
  logits, loss, grads = jax.jit(run)(params, rest, tokens)
  return logits, loss, nnx.to_pure_dict(grads)


def models(meshes: list[dict]) -> None:
  import jax
  import numpy as np

  from deepseek_jax import sharding
  from deepseek_jax.params import flat_state

  for scan in (False, True):
    cfg, model, tokens, tc, make_loss_fn = _setup({"scan_layers": scan})
    ref_logits, ref_loss, ref_grads = _logits_loss_and_grads(model, tokens, cfg, tc,
                                                             make_loss_fn)
    ref_logits = np.asarray(ref_logits)
    ref_grads = jax.tree.map(np.asarray, ref_grads)
    for sizes in meshes:
      if scan and not sizes.get("scan"):
        continue
      sizes = {k: v for k, v in sizes.items() if k != "scan"}
      mesh = sharding.make_mesh(**sizes)
      sm = sharding.shard_model(model, mesh)
      batch = jax.sharding.NamedSharding(mesh, sharding.batch_spec())
      toks = jax.device_put(tokens, batch)
      with jax.set_mesh(mesh):  # the model itself picks the expert-parallel exchange
        forward_jaxpr = str(jax.make_jaxpr(lambda m, x: m(x))(sm, toks[:, :-1]))
        logits, loss, grads = _logits_loss_and_grads(sm, toks, cfg, tc, make_loss_fn)
      flat_grads = jax.tree.map(np.asarray, grads)
      grad_err = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))
                     for a, b in zip(jax.tree.leaves(flat_grads), jax.tree.leaves(ref_grads)))
      shards = {p: {"shape": list(v.shape), "shard": list(v.addressable_shards[0].data.shape),
                    "spec": [list(a) if isinstance(a, tuple) else a for a in v.sharding.spec]}
                for p, v in flat_state(sm).items()}
      print(json.dumps({
          "mesh": sizes, "scan": scan, "all_to_all": "all_to_all" in forward_jaxpr,
          "shard_map": "shard_map" in forward_jaxpr,
          "logits_err": float(np.max(np.abs(np.asarray(logits) - ref_logits))),
          "loss": float(loss), "ref_loss": float(ref_loss), "grad_rel_err": grad_err,
          "shards": shards}), flush=True)
  # created directly in shards equals the unsharded init
  cfg, model, *_ = _setup()
  mesh = sharding.make_mesh(fsdp=2, expert=4)
  created = sharding.create_sharded(cfg, mesh, rngs_seed=0)
  a, b = flat_state(created), flat_state(model)
  print(json.dumps({"create_sharded_err": max(float(np.max(np.abs(np.asarray(a[p]) - b[p])))
                                              for p in b),
                    "create_sharded_specs": {p: str(v.sharding.spec) for p, v in a.items()}}),
        flush=True)


def ep() -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from deepseek_jax import dispatch, sharding
  from deepseek_jax.expert_parallel import expert_parallel_moe, routed_experts

  n, k, e, d, i = 64, 2, 8, 16, 8
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  w = [jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32) for s in ((e, d, i), (e, d, i), (e, i, d))]
  weight = jnp.asarray(rng.uniform(size=(n, k)), jnp.float32)
  routings = {
      "random": jnp.asarray(np.argsort(rng.uniform(size=(n, e)), axis=1)[:, :k], jnp.int32),
      "skewed": jnp.asarray(np.tile([0, 1], (n, 1)), jnp.int32),       # every copy on device 0
      "balanced": jnp.asarray((np.arange(n * k) % e).reshape(n, k), jnp.int32),
  }
  def loss(f, x, ws):
    return jnp.sum(f(x, ws) ** 2)

  for sizes in ({"expert": 8}, {"data": 2, "expert": 4}, {"fsdp": 2, "expert": 2, "tensor": 2}):
    mesh = sharding.make_mesh(**sizes)
    names = ("layers.1.mlp.experts.gate_proj", "layers.1.mlp.experts.up_proj",
             "layers.1.mlp.experts.down_proj")
    ws = [jax.device_put(a, sharding.param_shardings({p: a}, mesh)[p]) for p, a in zip(names, w)]
    for name, idx in routings.items():
      dense = lambda x, ws: dispatch.moe_experts(x, idx, weight, *ws, method="dense")
      ref = dense(x, w)
      ref_g = jax.grad(lambda x, ws: loss(dense, x, ws), argnums=(0, 1))(x, w)
      for cf in (None, 1.0):
        f = lambda x, ws: expert_parallel_moe(x, idx, weight, *ws, mesh=mesh, capacity_factor=cf)
        with jax.set_mesh(mesh):
          out = jax.jit(f)(x, ws)
          g = (jax.jit(jax.grad(lambda x, ws: loss(f, x, ws), argnums=(0, 1)))(x, ws)
               if cf is None else None)  # gradients only where the result must be exact
        gerr = None if g is None else max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)))
        print(json.dumps({"mesh": sizes, "routing": name, "capacity_factor": cf,
                          "err": float(np.max(np.abs(np.asarray(out) - np.asarray(ref)))),
                          "grad_err": gerr,
                          "grad_max": max(float(np.max(np.abs(a))) for a in jax.tree.leaves(ref_g)),
                          "ref_max": float(np.max(np.abs(ref))),
                          "finite": bool(np.all(np.isfinite(np.asarray(out))))}), flush=True)
  # token counts that do not split over the mesh (decode): padded with expert-less tokens
  mesh = sharding.make_mesh(data=2, expert=4)
  for n_odd in (1, 13):
    idx = routings["random"][:n_odd]
    ref = dispatch.moe_experts(x[:n_odd], idx, weight[:n_odd], *w, method="dense")
    with jax.set_mesh(mesh):  # the context mesh, through the model's entry point
      out = jax.jit(lambda x, i, wt, ws: routed_experts(
          x, i, wt, *ws, method="blocked"))(x[:n_odd], idx, weight[:n_odd], w)
    print(json.dumps({"odd_tokens": n_odd, "shape": list(out.shape),
                      "err": float(np.max(np.abs(np.asarray(out) - np.asarray(ref))))}))
  # the model's entry point with the capacity dispatch asked for (each device runs its share
  # through `blocked`, see expert_parallel._local): forward and gradients equal the dense ones
  idx = routings["random"]
  dense = lambda x, ws: dispatch.moe_experts(x, idx, weight, *ws, method="dense")
  cap = lambda x, ws: routed_experts(x, idx, weight, *ws, method="capacity")
  ref, ref_g = dense(x, w), jax.grad(lambda x, ws: loss(dense, x, ws), argnums=(0, 1))(x, w)
  with jax.set_mesh(mesh):
    out = jax.jit(cap)(x, w)
    g = jax.jit(jax.grad(lambda x, ws: loss(cap, x, ws), argnums=(0, 1)))(x, w)
  print(json.dumps({"capacity_method": True,
                    "err": float(np.max(np.abs(np.asarray(out) - np.asarray(ref)))),
                    "grad_err": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                                    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g))),
                    "ref_max": float(np.max(np.abs(ref))),
                    "grad_max": max(float(np.max(np.abs(a))) for a in jax.tree.leaves(ref_g))}),
        flush=True)
  # activations pinned by their logical axes; a no-op without a mesh
  act = jnp.ones((4, 6, 16))
  names = ("batch", "length", "embed")
  with jax.set_mesh(mesh):
    inside = jax.jit(lambda a: sharding.shard_activation(a, names) * 2)(act)
    small = jax.jit(lambda a: sharding.shard_activation(a, names) * 2)(act[:1])
  outside = jax.jit(lambda a: sharding.shard_activation(a, names) * 2)(act)
  print(json.dumps({"activation": str(inside.sharding.spec), "activation_b1":
                    str(small.sharding.spec), "activation_outside": type(outside.sharding).__name__,
                    "activation_ok": bool(np.all(np.asarray(inside) == 2))}))
  try:
    expert_parallel_moe(x, routings["random"], weight, *w, mesh=sharding.make_mesh(expert=8),
                        capacity_factor=0.0)
  except ValueError as err:
    print(json.dumps({"error": str(err)}))


def step(process_id: int, num_processes: int, port: int) -> None:
  """One trainer step on a data 2 x fsdp 2 x expert 2 mesh over all processes' devices."""
  from deepseek_jax import sharding
  if num_processes > 1:
    sharding.initialize(f"127.0.0.1:{port}", num_processes, process_id, initialization_timeout=60)
  import jax
  import numpy as np
  from flax import nnx

  from deepseek_jax import get_preset, optim
  from deepseek_jax.train_config import TrainConfig
  from deepseek_jax.train_step import make_train_step

  assert jax.device_count() == 8 and jax.process_count() == num_processes
  cfg = get_preset("tiny_v3", num_hidden_layers=2)
  tc = TrainConfig(preset="tiny_v3", warmup_steps=0)
  # across processes, data spans them (as it spans slices of a TPU pod)
  mesh = sharding.make_mesh(data=2, fsdp=2, expert=2,
                            dcn={"data": 2} if num_processes > 1 else None)
  model = sharding.create_sharded(cfg, mesh, rngs_seed=0)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optim.make_optimizer(tc.optim_config())
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 8, 17)).astype(np.int32)
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))
  # each process supplies only the rows its devices hold
  toks = jax.make_array_from_callback(tokens.shape, spec, lambda index: tokens[index])
  with jax.set_mesh(mesh):
    state = {"params": params, "rest": rest, "opt_state": jax.jit(tx.init)(params),
             "step": np.zeros((), np.int32)}
    _, logs = jax.jit(make_train_step(graphdef, tx, cfg, tc))(state, toks)
  print(json.dumps({"process": jax.process_index(), "loss": float(logs["loss"]),
                    "grad_norm": float(logs["grad_norm"])}), flush=True)


def pretrained(hf_dir: str, orbax_dir: str, workdir: str) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from deepseek_jax import sharding
  from deepseek_jax import from_pretrained
  from deepseek_jax.params import flat_state

  from deepseek_jax import generate
  one = from_pretrained(hf_dir, dtype=jnp.float32)
  tokens = np.random.default_rng(0).integers(0, one.cfg.vocab_size, (8, 12)).astype(np.int32)
  ref = np.asarray(jax.jit(lambda m, x: m(x))(one, tokens))
  prompts = [[5, 9, 2], [7, 1, 3, 8, 4]]
  ref_new = generate(one, prompts, 6, eos_id=-1)
  mesh = sharding.make_mesh(fsdp=2, expert=4)
  names = {hf_dir: "safetensors", orbax_dir: "orbax", workdir: "workdir"}
  for src, scan in ((hf_dir, False), (orbax_dir, False), (orbax_dir, True), (workdir, False),
                    (workdir, True)):
    model = from_pretrained(src, dtype=jnp.float32, mesh=mesh, scan_layers=scan)
    want = sharding.model_shardings(model.cfg, mesh, scanned=scan)
    flat = flat_state(model)
    wrong = [p for p, v in flat.items() if not v.sharding.is_equivalent_to(want[p], v.ndim)]
    expert_path = next(p for p in flat if ".experts." in p and "shared" not in p)
    with jax.set_mesh(mesh):
      toks = jax.device_put(tokens, jax.sharding.NamedSharding(mesh, sharding.batch_spec()))
      logits = np.asarray(jax.jit(lambda m, x: m(x))(model, toks))
      same_generation = generate(model, prompts, 6, eos_id=-1) == ref_new
    print(json.dumps({"same_generation": same_generation, "source": names[src], "scan": scan,
                      "logits_err": float(np.max(np.abs(logits - ref))), "wrong": wrong,
                      "expert_path": expert_path, "expert_shape": list(flat[expert_path].shape),
                      "expert_shard": list(flat[expert_path].addressable_shards[0].data.shape)}),
          flush=True)


def lora() -> None:
  """A LoRA model (scanned, adapters on every projection, routed experts included) on an
  fsdp 2 x expert 4 mesh: adapters placed as their weights are, and one training step's loss and
  adapter update equal one device's."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from deepseek_jax import adapters, get_preset, optim, sharding
  from deepseek_jax.layers import LoRAParam
  from deepseek_jax.model import DeepseekForCausalLM
  from deepseek_jax.train_config import TrainConfig
  from deepseek_jax.train_step import make_train_step

  cfg = get_preset("tiny_v3", num_hidden_layers=2, scan_layers=True)
  tc = TrainConfig(learning_rate=1e-2, warmup_steps=0)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 8, 17)).astype(np.int32)
  tx = optim.make_optimizer(tc.optim_config())

  def one_step(model, mesh=None):
    graphdef, params, frozen, rest = nnx.split(model, LoRAParam, nnx.Param, ...)
    state = {"params": params, "frozen": frozen, "rest": rest, "opt_state": tx.init(params),
             "step": jnp.zeros((), jnp.int32)}
    step = jax.jit(make_train_step(graphdef, tx, model.cfg, tc))
    if mesh is None:
      return step(state, tokens)
    with jax.set_mesh(mesh):
      spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))
      return step(state, jax.device_put(tokens, spec))

  base = DeepseekForCausalLM(cfg, rngs=nnx.Rngs(0))
  ref_state, ref_logs = one_step(adapters.with_adapters(base, rank=4, seed=1))
  mesh = sharding.make_mesh(fsdp=2, expert=4)
  sharded = adapters.with_adapters(sharding.shard_model(base, mesh), rank=4, seed=1, mesh=mesh)
  want = sharding.model_shardings(sharded.cfg, mesh, scanned=True)
  lora = adapters.adapter_state(sharded)
  wrong = [p for p, v in lora.items() if not v.sharding.is_equivalent_to(want[p], v.ndim)]
  expert_a = next(p for p in lora if "experts.gate_proj_lora_a" in p)
  state, logs = one_step(sharded, mesh)
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref_state["params"])))
  print(json.dumps({"wrong": wrong, "adapters": len(lora),
                    "expert_adapter_shard": list(lora[expert_a].addressable_shards[0].data.shape),
                    "expert_adapter_shape": list(lora[expert_a].shape),
                    "loss": float(logs["loss"]), "ref_loss": float(ref_logs["loss"]),
                    "param_diff": diff}), flush=True)


if __name__ == "__main__":
  cmd = sys.argv[1]
  if cmd == "models":
    models(json.loads(sys.argv[2]))
  elif cmd == "ep":
    ep()
  elif cmd == "step":
    step(*map(int, sys.argv[2:5]))
  elif cmd == "lora":
    lora()
  elif cmd == "pretrained":
    pretrained(*sys.argv[2:5])
  else:
    raise SystemExit(f"unknown command {cmd!r}")
