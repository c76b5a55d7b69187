"""Routed-expert computation as pure functions, with interchangeable implementations.

Every method computes, for tokens x [N, D] each routed to K experts with weights w:

  y_n = sum_k w_{n,k} * down_e(silu(gate_e(x_n)) * up_e(x_n)),   e = topk_idx[n, k]

- `dense`: every expert on every token, masked by the routing weights. Readable reference;
  costs E/K times the useful FLOPs.
- `ragged`: token copies sorted by expert, one `jax.lax.ragged_dot` per projection; dropless.
- `blocked`: token copies sorted by expert, each expert's group padded to a multiple of a tile;
  every tile then belongs to one expert, and a loop over the filled tiles multiplies each by its
  expert's weight, indexed in place (`tiled_gmm`, custom VJP). Dropless and exact: the padding
  is a static bound (at most E*(tile-1) rows), not a capacity. The fast path where ragged_dot
  is a masked dense product (CPU); a handful of copies (decoding) index their experts directly.
- `pallas`: the same sorted layout through the Pallas grouped matmul (`kernels_pallas.gmm`).

The permutation helpers (`sort_by_expert`, `combine`) are shared by every sorted path, the
expert-parallel one included.

Legend: N tokens, K experts per token, E experts, D hidden, I expert width, M = N*K copies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

METHODS = ("dense", "ragged", "blocked", "pallas")


def default_method(platform: str | None = None) -> str:
  """The Pallas grouped matmul on TPU (its kernel is written for Mosaic TPU and does not lower for
  GPU); ragged_dot on GPU, where XLA lowers it to a grouped GEMM; the tiled matmul on CPU, where
  ragged_dot is a masked dense product (bench/dispatch.py)."""
  platform = platform or jax.default_backend()
  if platform == "tpu":
    return "pallas"
  return "ragged" if platform in ("gpu", "cuda", "rocm") else "blocked"


def sort_by_expert(topk_idx: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
  """Order of the M = N*K token copies sorted by expert (stable) and tokens per expert [E]."""
  flat = topk_idx.reshape(-1)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)  # [M]
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # [E]
  return order, group_sizes


def combine(y_sorted: jax.Array, order: jax.Array, topk_weight: jax.Array, num_tokens: int) -> jax.Array:
  """Weighted scatter of expert outputs [M, D] (in sorted order) back to tokens [N, D]."""
  k = topk_weight.shape[-1]
  w = topk_weight.reshape(-1)[order].astype(jnp.float32)  # [M]
  token = order // k  # [M] token of each sorted copy
  y = y_sorted.astype(jnp.float32) * w[:, None]
  return jax.ops.segment_sum(y, token, num_segments=num_tokens).astype(y_sorted.dtype)


def _dense(x, topk_idx, topk_weight, w_gate, w_up, w_down):
  e = w_gate.shape[0]
  weights = jnp.sum(jax.nn.one_hot(topk_idx, e, dtype=jnp.float32) * topk_weight[..., None], axis=1)  # [N, E]
  h = jax.nn.silu(jnp.einsum("nd,edi->nei", x, w_gate)) * jnp.einsum("nd,edi->nei", x, w_up)
  y = jnp.einsum("nei,eid->ned", h, w_down)
  return jnp.einsum("ned,ne->nd", y.astype(jnp.float32), weights).astype(x.dtype)


def _sorted(x, topk_idx, topk_weight, w_gate, w_up, w_down, grouped_matmul):
  n, k = topk_idx.shape
  order, group_sizes = sort_by_expert(topk_idx, w_gate.shape[0])
  xs = x[order // k]  # [M, D]
  h = jax.nn.silu(grouped_matmul(xs, w_gate, group_sizes)) * grouped_matmul(xs, w_up, group_sizes)
  return combine(grouped_matmul(h, w_down, group_sizes), order, topk_weight, n)


@jax.custom_vjp
def tiled_gmm(lhs: jax.Array, rhs: jax.Array, tile_group: jax.Array,
              num_used: jax.Array) -> jax.Array:
  """Grouped matmul over row tiles: tile t of lhs [T*tile, K] times rhs[tile_group[t]] [K, N],
  for the first `num_used` tiles (a traced count); the rows of the other tiles come out zero.

  One loop step per used tile indexes its group's weight in place (no gathered copy of the
  weights), and the tiles past the used ones (the static bound's slack) cost nothing; the VJP
  loops the same way and accumulates the weight gradient per group.
  """
  return _tiled_fwd(lhs, rhs, tile_group, num_used)[0]


def _tile_rows(x: jax.Array, tile_group: jax.Array) -> int:
  return x.shape[0] // tile_group.shape[0]


def _tiled_fwd(lhs, rhs, tile_group, num_used):
  rows = _tile_rows(lhs, tile_group)

  def step(t, out):  # out [T*tile, N]
    a = jax.lax.dynamic_slice_in_dim(lhs, t * rows, rows)               # [tile, K]
    return jax.lax.dynamic_update_slice_in_dim(out, a @ rhs[tile_group[t]], t * rows, 0)

  out = jax.lax.fori_loop(0, num_used, step,
                          jnp.zeros((lhs.shape[0], rhs.shape[-1]), lhs.dtype))
  return out, (lhs, rhs, tile_group, num_used)


def _tiled_bwd(res, g):
  lhs, rhs, tile_group, num_used = res
  rows = _tile_rows(lhs, tile_group)

  def step(t, carry):  # d_lhs [T*tile, K], d_rhs [E, K, N] float32
    d_lhs, d_rhs = carry
    gy = jax.lax.dynamic_slice_in_dim(g, t * rows, rows)                 # [tile, N]
    x = jax.lax.dynamic_slice_in_dim(lhs, t * rows, rows)                # [tile, K]
    grp = tile_group[t]
    d_lhs = jax.lax.dynamic_update_slice_in_dim(d_lhs, gy @ rhs[grp].T, t * rows, 0)
    return d_lhs, d_rhs.at[grp].add(x.T @ gy)

  d_lhs, d_rhs = jax.lax.fori_loop(0, num_used, step, (jnp.zeros_like(lhs),
                                                        jnp.zeros(rhs.shape, jnp.float32)))
  return d_lhs, d_rhs.astype(rhs.dtype), None, None


tiled_gmm.defvjp(_tiled_fwd, _tiled_bwd)


def _gathered(x, topk_idx, topk_weight, w_gate, w_up, w_down):
  """Each token copy with its own expert's weights indexed: for a handful of copies (decoding),
  reads only the chosen experts instead of a tile per expert."""
  h = (jax.nn.silu(jnp.einsum("nd,nkdi->nki", x, w_gate[topk_idx]))
       * jnp.einsum("nd,nkdi->nki", x, w_up[topk_idx]))
  y = jnp.einsum("nki,nkid->nkd", h, w_down[topk_idx])
  return jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), topk_weight.astype(jnp.float32)).astype(x.dtype)


# Up to this many token copies, `blocked` indexes each copy's expert weights directly.
GATHER_MAX_COPIES = 16


def _blocked(x, topk_idx, topk_weight, w_gate, w_up, w_down, tile: int):
  n, k = topk_idx.shape
  e, d = w_gate.shape[0], x.shape[-1]
  m = n * k
  if m <= GATHER_MAX_COPIES:
    return _gathered(x, topk_idx, topk_weight, w_gate, w_up, w_down)
  tile = tile_size(m, e, tile)
  num_tiles = -(-(m + e * (tile - 1)) // tile)  # static bound on the padded row count
  order, group_sizes = sort_by_expert(topk_idx, e)
  padded = -(-group_sizes // tile) * tile  # [E]
  padded_end = jnp.cumsum(padded)
  expert_of_copy = topk_idx.reshape(-1)[order]  # [M] sorted
  rank = jnp.arange(m, dtype=jnp.int32) - (jnp.cumsum(group_sizes) - group_sizes)[expert_of_copy]
  dest = (padded_end - padded)[expert_of_copy] + rank  # [M] row in the padded layout
  # Rows move by gathers (cheaper than row scatters on CPU, forward and backward): padded row ->
  # its token (n: a zero row), and each token's k copies -> their padded rows.
  src = jnp.full((num_tiles * tile,), n, jnp.int32).at[dest].set(order // k)  # [tiles*tile]
  pos = jnp.zeros((m,), jnp.int32).at[order].set(dest).reshape(n, k)         # [N, K]
  xs = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])[src]                  # [tiles*tile, D]
  tile_expert = jnp.minimum(
      jnp.searchsorted(padded_end, jnp.arange(num_tiles) * tile, side="right"), e - 1)  # [tiles]
  used = padded_end[-1] // tile  # tiles holding copies; the rest of the static bound is slack
  h = (jax.nn.silu(tiled_gmm(xs, w_gate, tile_expert, used))
       * tiled_gmm(xs, w_up, tile_expert, used))
  y = tiled_gmm(h, w_down, tile_expert, used)  # [tiles*tile, D]
  return jnp.einsum("nkd,nk->nd", y[pos].astype(jnp.float32),
                    topk_weight.astype(jnp.float32)).astype(x.dtype)


def tile_size(copies: int, experts: int, tile: int = 128) -> int:
  """`blocked`'s tile: at most `tile` rows, near one expert's average group (a multiple of 8), so
  that few copies per expert leave little padding."""
  return max(8, min(tile, _round_up(-(-copies // experts), 8)))


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _ragged_dot(lhs, rhs, group_sizes):
  return jax.lax.ragged_dot(lhs, rhs, group_sizes)


# Run the Pallas kernel interpreted? None: when the default backend is the CPU. Exports for
# another platform from a CPU set it to False so the real kernel is lowered.
PALLAS_INTERPRET: bool | None = None


def pallas_interpret() -> bool:
  """Whether Pallas kernels (grouped matmul, MLA decode) run interpreted: PALLAS_INTERPRET, else
  when the default backend is the CPU."""
  return jax.default_backend() == "cpu" if PALLAS_INTERPRET is None else PALLAS_INTERPRET


def _pallas_gmm(lhs, rhs, group_sizes):
  from kernels_pallas import gmm  # imported lazily: the kernels are optional on CPU
  return gmm(lhs, rhs, group_sizes, interpret=pallas_interpret())


def moe_experts(x: jax.Array, topk_idx: jax.Array, topk_weight: jax.Array, w_gate: jax.Array,
                w_up: jax.Array, w_down: jax.Array, *, method: str = "ragged",
                tile: int = 128) -> jax.Array:
  """Routed experts for x [N, D]; topk_idx/topk_weight [N, K]; weights [E, D, I], [E, D, I], [E, I, D]."""
  if method == "dense":
    return _dense(x, topk_idx, topk_weight, w_gate, w_up, w_down)
  if method == "ragged":
    return _sorted(x, topk_idx, topk_weight, w_gate, w_up, w_down, _ragged_dot)
  if method == "blocked":
    return _blocked(x, topk_idx, topk_weight, w_gate, w_up, w_down, tile)
  if method == "pallas":
    return _sorted(x, topk_idx, topk_weight, w_gate, w_up, w_down, _pallas_gmm)
  raise ValueError(f"moe dispatch method {method!r}: expected one of {METHODS}")
