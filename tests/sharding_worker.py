"""Subprocess worker for the sharding tests (8 host CPU devices, or one of two processes).

  python tests/sharding_worker.py models  MESHES_JSON      # sharded vs one device, several meshes
  python tests/sharding_worker.py ep                       # expert_parallel_moe vs dense
  python tests/sharding_worker.py step PROCESS_ID N PORT   # one training step's loss (N processes)

Prints one JSON object per line; the tests read them.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _setup(cfg_overrides=None):
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from deepseek_jax import get_preset
  from deepseek_jax.model import DeepseekForCausalLM
  from deepseek_jax.trainer import TrainConfig, make_loss_fn
  cfg = get_preset("tiny_v3", num_hidden_layers=2, **(cfg_overrides or {}))
  model = DeepseekForCausalLM(cfg, rngs=nnx.Rngs(0))
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 17)).astype(np.int32)
  tc = TrainConfig(preset="tiny_v3")
  return cfg, model, jnp.asarray(tokens), tc, make_loss_fn


def _loss_and_grads(model, tokens, cfg, tc, make_loss_fn):
  import jax
  from flax import nnx
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # Router biases differentiated too (as the trainer does: nnx.scan needs them traced alike).
  vg = jax.value_and_grad(make_loss_fn(graphdef, cfg, tc), argnums=(0, 1), has_aux=True)
  (loss, _), (grads, _) = jax.jit(vg)(params, rest, tokens)
  return loss, nnx.to_pure_dict(grads)


def models(meshes: list[dict]) -> None:
  import jax
  import numpy as np
  from flax import nnx

  import sharding
  from deepseek_jax.params import flat_state

  for scan in (False, True):
    cfg, model, tokens, tc, make_loss_fn = _setup({"scan_layers": scan})
    ref_logits = np.asarray(jax.jit(lambda m, x: m(x))(model, tokens[:, :-1]))
    ref_loss, ref_grads = _loss_and_grads(model, tokens, cfg, tc, make_loss_fn)
    ref_grads = jax.tree.map(np.asarray, ref_grads)
    for sizes in meshes:
      if scan and not sizes.get("scan"):
        continue
      sizes = {k: v for k, v in sizes.items() if k != "scan"}
      mesh = sharding.make_mesh(**sizes)
      sm = sharding.shard_model(model, mesh)
      batch = jax.sharding.NamedSharding(mesh, sharding.batch_spec())
      toks = jax.device_put(tokens, batch)
      with jax.set_mesh(mesh):
        logits = jax.jit(lambda m, x: m(x))(sm, toks[:, :-1])
        loss, grads = _loss_and_grads(sm, toks, cfg, tc, make_loss_fn)
      flat_grads = jax.tree.map(np.asarray, grads)
      grad_err = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))
                     for a, b in zip(jax.tree.leaves(flat_grads), jax.tree.leaves(ref_grads)))
      shards = {p: {"shape": list(v.shape), "shard": list(v.addressable_shards[0].data.shape),
                    "spec": [list(a) if isinstance(a, tuple) else a for a in v.sharding.spec]}
                for p, v in flat_state(sm).items()}
      print(json.dumps({
          "mesh": sizes, "scan": scan,
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


if __name__ == "__main__":
  cmd = sys.argv[1]
  if cmd == "models":
    models(json.loads(sys.argv[2]))
  else:
    raise SystemExit(f"unknown command {cmd!r}")
