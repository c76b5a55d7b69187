"""Expert parallelism: routed experts split over the "expert" mesh axis, token copies exchanged
with all-to-all inside `jax.shard_map`. `routed_experts` is what the MoE layer calls: this
exchange whenever the active mesh (`jax.set_mesh`) has an "expert" axis larger than one, the
local dispatch otherwise.

Per device (tokens split over the batch axes and "expert"; experts split over "expert", P ways,
E/P local experts each):
  1. each of the m = n*K local token copies goes to the device owning its expert,
     dest = expert // (E/P); its slot is its rank among the copies with the same dest;
  2. send buffers [P, C, D] (C slots per destination) go through `all_to_all`: device p receives
     [P, C, D], the copies every device sent to it, with their local expert ids;
  3. the local experts run on the received copies (`dispatch.moe_experts`, one expert per copy,
     empty slots weighted 0);
  4. the reverse `all_to_all` brings each result back to the slot it left from;
  5. results are combined with the routing weights: y_n = sum_k w_{n,k} out_{n,k}.
Capacity: dropless by default, C = m (all of a device's copies may go to one device), exact
whatever the routing. With `capacity_factor` f, C = ceil(f * m / P): buffers shrink by P/f, and
copies beyond a destination's C slots are dropped (they contribute 0, as in GShard/Switch).
A fixed C is used because `ragged_all_to_all` (variable-size exchange) is not implemented on
every platform (not on CPU).

Legend: N tokens, K experts per token, E experts, P expert-axis size, C slots per destination,
D hidden, I expert width, m = n*K local copies.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from deepseek_jax import dispatch

TOKEN_AXES = ("data", "fsdp", "expert")


def _capacity(m: int, p: int, capacity_factor: float | None) -> int:
  if capacity_factor is None:
    return m
  if capacity_factor <= 0:
    raise ValueError(f"capacity_factor={capacity_factor}: must be > 0 (or None for dropless)")
  return max(1, min(m, math.ceil(capacity_factor * m / p)))


def _local(x, topk_idx, topk_weight, w_gate, w_up, w_down, *, num_experts, p, capacity, method):
  """One device's share: x [n, D], topk [n, K], local weights [E/P, ...]."""
  n, k = topk_idx.shape
  d = x.shape[-1]
  e_loc = num_experts // p
  m = n * k
  expert = topk_idx.reshape(-1)                       # [m], -1: no expert (padding)
  dest = jnp.where(expert >= 0, expert // e_loc, p)   # [m] owning device along "expert"; p: none
  order = jnp.argsort(dest, stable=True)
  sorted_dest = dest[order]
  counts = jnp.bincount(dest, length=p + 1)           # [P + 1]
  start = jnp.cumsum(counts) - counts
  rank_sorted = jnp.arange(m) - start[sorted_dest]
  rank = jnp.zeros((m,), jnp.int32).at[order].set(rank_sorted.astype(jnp.int32))  # [m]
  keep = (rank < capacity) & (dest < p)               # dropped beyond the capacity
  slot = jnp.where(keep, dest * capacity + rank, p * capacity)  # out of range: dropped
  xs = jnp.repeat(x, k, axis=0)                       # [m, D] copy c = token c // K
  send_x = jnp.zeros((p * capacity, d), x.dtype).at[slot].set(xs, mode="drop")
  send_e = jnp.full((p * capacity,), -1, jnp.int32).at[slot].set(
      jnp.maximum(expert, 0).astype(jnp.int32) % e_loc, mode="drop")
  recv_x = jax.lax.all_to_all(send_x.reshape(p, capacity, d), "expert", 0, 0)    # [P, C, D]
  recv_e = jax.lax.all_to_all(send_e.reshape(p, capacity), "expert", 0, 0)       # [P, C]
  recv_x, recv_e = recv_x.reshape(-1, d), recv_e.reshape(-1)
  valid = recv_e >= 0
  # The received rows are a static bound (mostly empty when dropless), not copies: `capacity`'s
  # slots, sized from the rows, would multiply the work; its overflow tiles (`blocked`) do not.
  local = "blocked" if method == "capacity" else method
  y = dispatch.moe_experts(recv_x, jnp.maximum(recv_e, 0)[:, None],
                           valid.astype(jnp.float32)[:, None], w_gate, w_up, w_down,
                           method=local)                                        # [P*C, D]
  back = jax.lax.all_to_all(y.reshape(p, capacity, d), "expert", 0, 0).reshape(-1, d)
  out = jnp.where(keep[:, None], back[jnp.minimum(slot, p * capacity - 1)], 0)  # [m, D]
  w = topk_weight.reshape(-1).astype(jnp.float32)
  y_tok = jnp.sum((out.astype(jnp.float32) * w[:, None]).reshape(n, k, d), axis=1)  # [n, D]
  return y_tok.astype(x.dtype)


def expert_parallel_moe(x: jax.Array, topk_idx: jax.Array, topk_weight: jax.Array,
                        w_gate, w_up, w_down, *,
                        mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
                        capacity_factor: float | None = None,
                        method: str = "blocked") -> jax.Array:
  """Routed experts for x [N, D] with experts split over the mesh's "expert" axis.

  topk_idx/topk_weight [N, K] (an index of -1 selects no expert); w_gate, w_up [E, D, I];
  w_down [E, I, D] (arrays, or `dispatch.ExpertWeights` with LoRA adapters, split alike over
  "expert"); `mesh` defaults to the current one (`jax.set_mesh`). Tokens are split over
  the mesh's data, fsdp and expert axes (padded with expert-less tokens up to a multiple of
  their product, so any N works, decode steps included); weights enter split over "expert" only
  (gathered along the other axes, as FSDP does per layer). `method` is the dispatch of the local
  experts (`dispatch.moe_experts`). Equals `dispatch.moe_experts(..., method="dense")` when
  dropless (the default).
  """
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh.empty or "expert" not in mesh.axis_names:
    raise ValueError(f"expert_parallel_moe: the mesh has no 'expert' axis (axes {mesh.axis_names}); "
                     "pass mesh= or call it under jax.set_mesh")
  p = mesh.shape["expert"]
  w_gate, w_up, w_down = map(dispatch.as_expert_weights, (w_gate, w_up, w_down))
  e = w_gate.w.shape[0]
  if e % p:
    raise ValueError(f"expert_parallel_moe: {e} experts do not split over mesh axis expert of "
                     f"size {p}")
  token_axes = tuple(a for a in TOKEN_AXES if a in mesh.axis_names)
  shards = math.prod(mesh.shape[a] for a in token_axes)
  n = x.shape[0]
  pad = -n % shards
  if pad:
    x = jnp.pad(x, ((0, pad), (0, 0)))
    topk_idx = jnp.pad(topk_idx, ((0, pad), (0, 0)), constant_values=-1)
    topk_weight = jnp.pad(topk_weight, ((0, pad), (0, 0)))
  capacity = _capacity(((n + pad) // shards) * topk_idx.shape[1], p, capacity_factor)
  tok, wts = P(token_axes), P("expert")

  def body(x, idx, w, g, u, dn):
    return _local(x, idx, w, g, u, dn, num_experts=e, p=p, capacity=capacity, method=method)

  # check_vma off: the blocked grouped matmul's backward scan starts from an invariant zero carry.
  fn = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, wts, wts, wts), out_specs=tok,
                     check_vma=False)
  return fn(x, topk_idx, topk_weight, w_gate, w_up, w_down)[:n]


def routed_experts(x: jax.Array, topk_idx: jax.Array, topk_weight: jax.Array, w_gate, w_up,
                   w_down, *, method: str) -> jax.Array:
  """`dispatch.moe_experts`, expert-parallel (dropless) when the active mesh has an "expert" axis
  of size > 1; `method` is the local dispatch (on each device's share under the exchange)."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.shape.get("expert", 1) > 1:
    return expert_parallel_moe(x, topk_idx, topk_weight, w_gate, w_up, w_down, mesh=mesh,
                               method=method)
  return dispatch.moe_experts(x, topk_idx, topk_weight, w_gate, w_up, w_down, method=method)
