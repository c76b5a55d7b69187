"""Routed-expert computation as pure functions, with interchangeable implementations.

Every method computes, for tokens x [N, D] each routed to K experts with weights w:

  y_n = sum_k w_{n,k} * down_e(silu(gate_e(x_n)) * up_e(x_n)),   e = topk_idx[n, k]

- `dense`: every expert on every token, masked by the routing weights. Readable reference;
  costs E/K times the useful FLOPs.
- `ragged`: token copies sorted by expert, one `jax.lax.ragged_dot` per projection; dropless.
- `blocked`: token copies sorted by expert, each expert's group padded to a multiple of a tile;
  every tile then belongs to one expert, and a loop over the filled tiles multiplies each by its
  expert's weight, indexed in place (`kernels_pallas.tiled_gmm`). Dropless and exact: the padding
  is a static bound (at most E*(tile-1) rows), not a capacity. The fast path where ragged_dot
  is a masked dense product (CPU); a handful of copies (decoding) loop over the chosen experts.
- `capacity`: token copies bucketed per expert into C static slots (`capacity`: a balanced
  router's largest group), three batched matmuls over [E, C, ·] forward and backward, rows moved
  in and out by gathers in both directions (`_to_slots`, `_from_slots`). The copies beyond an
  expert's C slots (routers are rarely balanced) go through a loop (`_capacity_apply`): one step
  per tile of an expert's overflow, gathering its rows, so its cost follows the overflow (none: no
  step). Dropless and exact whatever the routing. XLA runs a batched matmul near its dense GEMM
  rate; the slack slots cost E*C/M - 1 extra rows (about 15% at 512 copies per expert), and
  only the overflow is tiled. Below a few copies per expert (decoding) it runs `native` on the
  CPU, or `blocked` elsewhere.
- `native`: the sorted copies through XLA:CPU custom calls (`deepseek_jax.cpu_gmm`, C++ built on
  first use), forward and backward: each group computes exactly its rows, reading its expert's
  weights in place, so it pays neither `capacity`'s slack nor its overflow loop. The CPU default
  (bench/dispatch.py, bench/train.py, bench/generate.py). float32 without adapters on the CPU
  only: bf16 or LoRA weights, another platform's lowering, or a machine without a C++ compiler
  run `capacity` instead.
- `pallas`: the same sorted layout through the Pallas grouped matmul (`kernels_pallas.gmm`:
  Mosaic TPU on TPUs, Triton on GPUs, interpreted on the CPU).

The permutation helpers (`sort_by_expert`, `combine`) are shared by every sorted path. Experts
split over a mesh's "expert" axis go through `deepseek_jax.expert_parallel`, which runs one of
these methods on each device's share.

Legend: N tokens, K experts per token, E experts, D hidden, I expert width, M = N*K copies,
C slots per expert, S = E*C slots, T tiles.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from deepseek_jax import cpu_gmm
from deepseek_jax.kernels_pallas import gmm, tiled_gmm

METHODS = ("dense", "ragged", "blocked", "capacity", "native", "pallas")


def default_method(platform: str | None = None) -> str:
  """The Pallas grouped matmul on TPUs and GPUs (`kernels_pallas.gmm`: Mosaic TPU, or Triton on
  NVIDIA and AMD GPUs, where XLA's ragged_dot runs far below a grouped GEMM); `native` on the
  CPU, where ragged_dot is a masked dense product and Pallas only interprets (its custom calls
  beat `capacity`'s batched matmuls, which it falls back to where it cannot run:
  bench/dispatch.py). Every method stays selectable everywhere."""
  platform = platform or jax.default_backend()
  return "pallas" if platform in ("tpu", "gpu", "cuda", "rocm") else "native"


def resolve(method: str, platform: str | None = None) -> str:
  """A configured method with "auto" replaced by `default_method` for `platform` (default: the
  backend the model is being traced for, `jax.default_backend()`)."""
  if method == "auto":
    return default_method(platform)
  if method not in METHODS:
    raise ValueError(f"moe dispatch method {method!r}: expected auto or one of {METHODS}")
  return method


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


class ExpertWeights(NamedTuple):
  """One projection of E experts: w [E, K, N], and optionally a LoRA adapter a [E, K, r],
  b [E, r, N] (already multiplied by its scale alpha/r): x -> x w_e + (x a_e) b_e."""
  w: jax.Array
  a: jax.Array | None = None
  b: jax.Array | None = None


def as_expert_weights(p) -> ExpertWeights:
  """An array of expert weights as an `ExpertWeights` without adapter; one passes through."""
  return p if isinstance(p, ExpertWeights) else ExpertWeights(p)


def _swiglu(lhs, mm, w_gate, w_up, w_down):
  """down(silu(gate(lhs)) * up(lhs)) where `mm(lhs, w)` is the method's grouped matmul; a LoRA
  adapter goes through the same grouped matmul twice (x a, then (x a) b)."""
  def apply(p: ExpertWeights, x):
    y = mm(x, p.w)
    return y if p.a is None else y + mm(mm(x, p.a), p.b)
  h = jax.nn.silu(apply(w_gate, lhs)) * apply(w_up, lhs)
  return apply(w_down, h)


def _dense(x, topk_idx, topk_weight, w_gate, w_up, w_down):
  e = w_gate.w.shape[0]
  weights = jnp.sum(jax.nn.one_hot(topk_idx, e, dtype=jnp.float32) * topk_weight[..., None], axis=1)  # [N, E]

  def mm(lhs, w):  # every expert on every token: [N, D] or [N, E, ·] -> [N, E, ·]
    return jnp.einsum("nd,edi->nei" if lhs.ndim == 2 else "nei,eio->neo", lhs, w)
  y = _swiglu(x, mm, w_gate, w_up, w_down)                                  # [N, E, D]
  return jnp.einsum("ned,ne->nd", y.astype(jnp.float32), weights).astype(x.dtype)


def _sorted(x, topk_idx, topk_weight, w_gate, w_up, w_down, grouped_matmul):
  n, k = topk_idx.shape
  order, group_sizes = sort_by_expert(topk_idx, w_gate.w.shape[0])
  xs = x[order // k]  # [M, D]
  y = _swiglu(xs, lambda lhs, w: grouped_matmul(lhs, w, group_sizes), w_gate, w_up, w_down)
  return combine(y, order, topk_weight, n)


def _chosen_experts(x, topk_idx, topk_weight, w_gate, w_up, w_down):
  """A loop over the experts the copies chose (min(E, M) steps, static; the unchosen ones are
  skipped), each running on all N tokens weighted by their routing weight for it (0 where not
  routed): for a handful of copies (decoding) it reads only the chosen experts' weights, in
  place. Measured (bench/generate.py's config, 7 MoE layers, one token top-4): about 3 ms against
  16 ms for gathering each copy's weights."""
  n, k = topk_idx.shape
  e = w_gate.w.shape[0]
  flat = topk_idx.reshape(-1)
  steps = min(e, n * k)
  weight = jnp.zeros((n, e), jnp.float32).at[jnp.arange(n)[:, None], topk_idx].add(
      topk_weight.astype(jnp.float32))                                      # [N, E]
  chosen = jnp.zeros((e,), jnp.bool_).at[flat].set(True)                  # [E]
  ids = jnp.nonzero(chosen, size=steps, fill_value=0)[0].astype(jnp.int32)  # [steps]
  count = jnp.sum(chosen)

  def run(ex, acc):  # acc [N, D] float32
    y = _swiglu(x, jnp.matmul, *(_expert(p, ex) for p in (w_gate, w_up, w_down)))  # [N, D]
    return acc + y.astype(jnp.float32) * weight[:, ex][:, None]

  def step(i, acc):
    return jax.lax.cond(i < count, run, lambda ex, acc: acc, ids[i], acc)
  acc = jax.lax.fori_loop(0, steps, step, jnp.zeros(x.shape, jnp.float32))
  return acc.astype(x.dtype)


# Up to this many token copies, `blocked` loops over the chosen experts (`_chosen_experts`).
CHOSEN_LOOP_MAX_COPIES = 16


def _blocked(x, topk_idx, topk_weight, w_gate, w_up, w_down, tile: int):
  n, k = topk_idx.shape
  e, d = w_gate.w.shape[0], x.shape[-1]
  m = n * k
  if m <= CHOSEN_LOOP_MAX_COPIES:
    return _chosen_experts(x, topk_idx, topk_weight, w_gate, w_up, w_down)
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
  y = _swiglu(xs, lambda lhs, w: tiled_gmm(lhs, w, tile_expert, used), w_gate, w_up, w_down)
  return jnp.einsum("nkd,nk->nd", y[pos].astype(jnp.float32),
                    topk_weight.astype(jnp.float32)).astype(x.dtype)


def capacity(copies: int, experts: int) -> int:
  """`capacity`'s slots per expert C for M copies over E experts: the mean group M/E plus three
  standard deviations of a balanced router's group (about sqrt(M/E)), rounded up to a multiple
  of 8, at most M rounded up. A static function of the shapes: one compile per batch shape."""
  mean = copies / experts
  return min(_round_up(math.ceil(mean + 3 * math.sqrt(mean)), 8), _round_up(copies, 8))


# Below this many copies per expert on average (decode steps), `capacity` runs `_few_copies`:
# `native` on the CPU, else `blocked`; both read only the chosen experts' weights
# (bench/dispatch.py, bench/generate.py).
CAPACITY_MIN_COPIES_PER_EXPERT = 4
# Rows per tile of `capacity`'s overflow loop.
OVERFLOW_TILE = 32


@jax.custom_vjp
def _to_slots(x: jax.Array, slot_copy: jax.Array, pos: jax.Array) -> jax.Array:
  """Rows into slots: x [N, D] -> [S, D], slot s holding the token of copy slot_copy[s] (M: an
  empty slot, zero). pos [N, K] is the inverse map (copy -> its slot; S: in no slot), so the
  backward is a gather too: dx_n = sum_k g[pos[n, k]]."""
  k = pos.shape[1]
  return jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])[slot_copy // k]


def _to_slots_fwd(x, slot_copy, pos):
  return _to_slots(x, slot_copy, pos), pos


def _to_slots_bwd(pos, g):
  g = jnp.concatenate([g, jnp.zeros((1, g.shape[1]), g.dtype)])
  return jnp.sum(g[pos].astype(jnp.float32), axis=1).astype(g.dtype), None, None


_to_slots.defvjp(_to_slots_fwd, _to_slots_bwd)


@jax.custom_vjp
def _from_slots(ys: jax.Array, w: jax.Array, slot_copy: jax.Array, pos: jax.Array) -> jax.Array:
  """Slots back to tokens, weighted: y_n = sum_k w[n, k] ys[pos[n, k]] (a float32 sum; pos = S:
  nothing). The backward gathers as well: d_ys[s] = w(copy of s) dy(token of s)."""
  ys = jnp.concatenate([ys, jnp.zeros((1, ys.shape[1]), ys.dtype)])
  return jnp.einsum("nkd,nk->nd", ys[pos].astype(jnp.float32),
                    w.astype(jnp.float32)).astype(ys.dtype)


def _from_slots_fwd(ys, w, slot_copy, pos):
  return _from_slots(ys, w, slot_copy, pos), (ys, w, slot_copy, pos)


def _from_slots_bwd(res, dy):
  ys, w, slot_copy, pos = res
  k = pos.shape[1]
  dy32 = jnp.concatenate([dy, jnp.zeros((1, dy.shape[1]), dy.dtype)]).astype(jnp.float32)
  w_slot = jnp.concatenate([w.reshape(-1).astype(jnp.float32), jnp.zeros((1,))])[slot_copy]  # [S]
  d_ys = (dy32[slot_copy // k] * w_slot[:, None]).astype(ys.dtype)                         # [S, D]
  ys = jnp.concatenate([ys, jnp.zeros((1, ys.shape[1]), ys.dtype)])
  d_w = jnp.einsum("nkd,nd->nk", ys[pos].astype(jnp.float32), dy32[:-1]).astype(w.dtype)
  return d_ys, d_w, None, None


_from_slots.defvjp(_from_slots_fwd, _from_slots_bwd)


def _expert(p: ExpertWeights, e: jax.Array) -> ExpertWeights:
  """Expert e's slice of a projection (its adapter too): w [K, N], a [K, r], b [r, N]."""
  return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, e, 0, keepdims=False), p)


def _tile_out(rows, w_rows, w_gate, w_up, w_down):
  """One tile of copies of one expert: w_rows[r] * swiglu(rows[r]), float32 [tile, D]."""
  y = _swiglu(rows, jnp.matmul, w_gate, w_up, w_down)
  return y.astype(jnp.float32) * w_rows[:, None]


def _extended(x, topk_weight):
  """x and the flat routing weights, each with a zero row / entry appended (empty rows' index)."""
  return (jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)]),
          jnp.concatenate([topk_weight.reshape(-1).astype(jnp.float32), jnp.zeros((1,))]))


def _bucketed(x, topk_weight, slot_copy, pos, c, w_gate, w_up, w_down):
  """The copies in slots: three batched matmuls over [E, C, ·]; y [N, D]."""
  e, d = w_gate.w.shape[0], x.shape[1]
  xs = _to_slots(x, slot_copy, pos).reshape(e, c, d)                  # [E, C, D]

  def mm(lhs, w):  # [E, C, ·] @ [E, ·, ·'] -> [E, C, ·']
    return jnp.einsum("eci,eio->eco", lhs, w)
  ys = _swiglu(xs, mm, w_gate, w_up, w_down).reshape(e * c, d)        # [S, D]
  return _from_slots(ys, topk_weight, slot_copy, pos)                 # [N, D]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _capacity_apply(x, topk_weight, layout, c, w_gate, w_up, w_down):
  """`_bucketed` plus the overflow: y_n also sums w(c) * expert_e(c)(x_n) over the copies c of
  token n in the first `used` tiles of row_copy [T, tile] (flat copy ids; M: an empty row), each
  tile of one expert (tile_expert [T]). One loop step per used tile gathers its rows, runs its
  expert's SwiGLU and adds the weighted rows to their tokens. The backward takes the bucketed
  part's VJP, then loops over the same tiles (recomputing each) adding into those gradients: the
  overflow costs what its tiles hold, and nothing when there is none."""
  return _capacity_fwd(x, topk_weight, layout, c, w_gate, w_up, w_down)[0]


def _capacity_fwd(x, topk_weight, layout, c, w_gate, w_up, w_down):
  slot_copy, pos, row_copy, tile_expert, used = layout
  k = topk_weight.shape[1]
  y, vjp = jax.vjp(lambda x, tw, *ws: _bucketed(x, tw, slot_copy, pos, c, *ws),
                   x, topk_weight, w_gate, w_up, w_down)
  x_ext, w_ext = _extended(x, topk_weight)

  def step(t, acc):  # acc [N+1, D] float32
    cp, e = row_copy[t], tile_expert[t]
    out = _tile_out(x_ext[cp // k], w_ext[cp], _expert(w_gate, e), _expert(w_up, e),
                    _expert(w_down, e))
    return acc.at[cp // k].add(out)

  def overflow(y):
    acc = jnp.concatenate([y.astype(jnp.float32), jnp.zeros((1, x.shape[1]), jnp.float32)])
    return jax.lax.fori_loop(0, used, step, acc)[:-1].astype(y.dtype)

  # without overflow (the common case) the float32 accumulator is never built
  y = jax.lax.cond(used > 0, overflow, lambda y: y, y)
  return y, (vjp, x, topk_weight, layout, w_gate, w_up, w_down)


def _capacity_bwd(c, res, g):
  vjp, x, topk_weight, layout, w_gate, w_up, w_down = res
  _, _, row_copy, tile_expert, used = layout
  n, k = topk_weight.shape
  dx, dtw, *dws = vjp(g)
  weights = (w_gate, w_up, w_down)
  x_ext, w_ext = _extended(x, topk_weight)
  g_ext = jnp.concatenate([g, jnp.zeros((1, g.shape[1]), g.dtype)]).astype(jnp.float32)
  f32 = lambda a: a.astype(jnp.float32)  # noqa: E731  (a no-op in float32 training)

  def step(t, carry):
    dx, dtw, dws = carry
    cp, e = row_copy[t], tile_expert[t]
    tok = cp // k
    _, tile_vjp = jax.vjp(_tile_out, x_ext[tok], w_ext[cp], *(_expert(p, e) for p in weights))
    d_rows, d_w, *d_p = tile_vjp(g_ext[tok])
    dws = jax.tree.map(lambda acc, d: acc.at[e].add(d.astype(acc.dtype)), dws, tuple(d_p))
    return dx.at[tok].add(d_rows.astype(dx.dtype)), dtw.at[cp].add(d_w), dws

  def overflow(dx, dtw, dws):
    acc = (jnp.concatenate([f32(dx), jnp.zeros((1, dx.shape[1]), jnp.float32)]),
           jnp.concatenate([f32(dtw).reshape(-1), jnp.zeros((1,), jnp.float32)]),
           jax.tree.map(f32, dws))
    dx32, dtw32, dws32 = jax.lax.fori_loop(0, used, step, acc)
    return (dx32[:-1].astype(dx.dtype), dtw32[:-1].reshape(n, k).astype(dtw.dtype),
            jax.tree.map(lambda d, p: d.astype(p.dtype), dws32, dws))

  # without overflow the gradients pass through: no float32 copies of the weight gradients
  dx, dtw, dws = jax.lax.cond(used > 0, overflow, lambda *a: a, dx, dtw, tuple(dws))
  return (dx, dtw, None, *dws)


_capacity_apply.defvjp(_capacity_fwd, _capacity_bwd)


def _capacity(x, topk_idx, topk_weight, w_gate, w_up, w_down, tile: int):
  n, k = topk_idx.shape
  e = w_gate.w.shape[0]
  m = n * k
  if m <= CHOSEN_LOOP_MAX_COPIES or m < CAPACITY_MIN_COPIES_PER_EXPERT * e:
    return _few_copies(x, topk_idx, topk_weight, w_gate, w_up, w_down, tile)
  c = capacity(m, e)
  s = e * c
  flat = topk_idx.reshape(-1)
  order, sizes = sort_by_expert(flat, e)                              # stable: token order
  start = jnp.cumsum(sizes) - sizes                                   # [E]
  rank_sorted = jnp.arange(m, dtype=jnp.int32) - start[flat[order]]   # rank within its expert
  rank = jnp.zeros((m,), jnp.int32).at[order].set(rank_sorted)        # [M]
  slot = jnp.where(rank < c, flat * c + rank, s)                      # [M]; s: no slot
  slot_copy = jnp.full((s + 1,), m, jnp.int32).at[slot].set(
      jnp.arange(m, dtype=jnp.int32))[:s]                             # [S]; m: an empty slot
  pos = slot.reshape(n, k)                                            # [N, K]
  # Overflow: expert i's copies of rank >= C are the sorted positions [start_i + C, start_i +
  # size_i); each expert's overflow is padded to whole tiles of OVERFLOW_TILE rows.
  ot = OVERFLOW_TILE
  num_tiles = -(-(m + e * (ot - 1)) // ot)  # static bound (all copies of one expert overflowing)
  over = jnp.maximum(sizes - c, 0)                                    # [E]
  padded = -(-over // ot) * ot
  padded_end = jnp.cumsum(padded)
  row = jnp.arange(num_tiles * ot, dtype=jnp.int32)
  row_expert = jnp.minimum(jnp.searchsorted(padded_end, row, side="right"), e - 1)
  j = row - (padded_end - padded)[row_expert]                         # row within its expert
  src = jnp.minimum(start[row_expert] + c + j, m - 1)
  row_copy = jnp.where(j < over[row_expert], order[src], m).reshape(num_tiles, ot)  # [T, tile]
  used = padded_end[-1] // ot
  return _capacity_apply(x, topk_weight, (slot_copy, pos, row_copy, row_expert[::ot], used), c,
                         w_gate, w_up, w_down)


def _few_copies(x, topk_idx, topk_weight, w_gate, w_up, w_down, tile: int):
  """`capacity` below its threshold (decoding): `native` where it runs, else `blocked`; both
  read only the chosen experts' weights."""
  return _native_or(_blocked, x, topk_idx, topk_weight, w_gate, w_up, w_down, tile)


def _native_or(fallback, x, topk_idx, topk_weight, w_gate, w_up, w_down, tile: int):
  """On the CPU, with float32 weights and no adapter, the sorted copies through `cpu_gmm`
  (exact rows, each expert's weights read in place, forward and backward); elsewhere (another
  platform's lowering, bf16, LoRA, no C++ compiler) `fallback`."""
  ws = (w_gate, w_up, w_down)
  if not (x.dtype == jnp.float32 and all(p.a is None and p.w.dtype == jnp.float32 for p in ws)
          and cpu_gmm.available()):
    return fallback(x, topk_idx, topk_weight, *ws, tile)
  return jax.lax.platform_dependent(
      x, topk_idx, topk_weight, *(p.w for p in ws), cpu=_native,
      default=lambda x, i, tw, *w: fallback(x, i, tw, *map(ExpertWeights, w), tile))


def _native(x, topk_idx, topk_weight, w_gate, w_up, w_down):
  """The sorted copies through `cpu_gmm.grouped_matmul` (plain float32 weight arrays), rows moved
  by gathers in both directions, forward and backward, as `capacity` moves them (`_to_slots`,
  `_from_slots` over the M sorted positions; a plain gather's gradient would be a scatter-add)."""
  n, k = topk_idx.shape
  m = n * k
  order, sizes = sort_by_expert(topk_idx, w_gate.shape[0])
  pos = jnp.zeros((m,), jnp.int32).at[order].set(jnp.arange(m, dtype=jnp.int32))  # copy -> row
  pos = pos.reshape(n, k)
  xs = _to_slots(x, order, pos)                                                   # [M, D]
  y = _swiglu(xs, lambda lhs, w: cpu_gmm.grouped_matmul(lhs, w, sizes),
              *map(ExpertWeights, (w_gate, w_up, w_down)))                        # [M, D]
  return _from_slots(y, topk_weight, order, pos)                                  # [N, D]


def tile_size(copies: int, experts: int, tile: int = 128) -> int:
  """`blocked`'s tile: at most `tile` rows, near one expert's average group (a multiple of 8), so
  that few copies per expert leave little padding."""
  return max(8, min(tile, _round_up(-(-copies // experts), 8)))


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def moe_experts(x: jax.Array, topk_idx: jax.Array, topk_weight: jax.Array, w_gate, w_up, w_down,
                *, method: str = "ragged", tile: int = 128) -> jax.Array:
  """Routed experts for x [N, D]; topk_idx/topk_weight [N, K]; weights [E, D, I], [E, D, I],
  [E, I, D], each an array or an `ExpertWeights` with a LoRA adapter."""
  w_gate, w_up, w_down = map(as_expert_weights, (w_gate, w_up, w_down))
  if method == "dense":
    return _dense(x, topk_idx, topk_weight, w_gate, w_up, w_down)
  if method == "ragged":
    return _sorted(x, topk_idx, topk_weight, w_gate, w_up, w_down, jax.lax.ragged_dot)
  if method == "blocked":
    return _blocked(x, topk_idx, topk_weight, w_gate, w_up, w_down, tile)
  if method == "capacity":
    return _capacity(x, topk_idx, topk_weight, w_gate, w_up, w_down, tile)
  if method == "native":
    return _native_or(_capacity, x, topk_idx, topk_weight, w_gate, w_up, w_down, tile)
  if method == "pallas":
    # the kernel is interpreted where the program is lowered for the CPU
    return _sorted(x, topk_idx, topk_weight, w_gate, w_up, w_down, gmm)
  raise ValueError(f"moe dispatch method {method!r}: expected one of {METHODS}")
