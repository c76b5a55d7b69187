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
  is a masked dense product (CPU); a handful of copies (decoding) index their experts directly.
- `pallas`: the same sorted layout through the Pallas grouped matmul (`kernels_pallas.gmm`:
  Mosaic TPU on TPUs, Triton on GPUs, interpreted on the CPU).

The permutation helpers (`sort_by_expert`, `combine`) are shared by every sorted path. Experts
split over a mesh's "expert" axis go through `deepseek_jax.expert_parallel`, which runs one of
these methods on each device's share.

Legend: N tokens, K experts per token, E experts, D hidden, I expert width, M = N*K copies.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from deepseek_jax.kernels_pallas import gmm, tiled_gmm

METHODS = ("dense", "ragged", "blocked", "pallas")


def default_method(platform: str | None = None) -> str:
  """The Pallas grouped matmul on TPUs and GPUs (`kernels_pallas.gmm`: Mosaic TPU, or Triton on
  NVIDIA and AMD GPUs, where XLA's ragged_dot runs far below a grouped GEMM); the tiled matmul on
  the CPU, where ragged_dot is a masked dense product and Pallas only interprets
  (bench/dispatch.py). `ragged` stays selectable everywhere."""
  platform = platform or jax.default_backend()
  return "pallas" if platform in ("tpu", "gpu", "cuda", "rocm") else "blocked"


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


def _gathered(x, topk_idx, topk_weight, w_gate, w_up, w_down):
  """Each token copy with its own expert's weights indexed: for a handful of copies (decoding),
  reads only the chosen experts instead of a tile per expert."""
  def mm(lhs, w):  # [N, D] or [N, K, ·] with each copy's expert's weights -> [N, K, ·]
    return jnp.einsum("nd,nkdi->nki" if lhs.ndim == 2 else "nki,nkio->nko", lhs, w[topk_idx])
  y = _swiglu(x, mm, w_gate, w_up, w_down)                                  # [N, K, D]
  return jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), topk_weight.astype(jnp.float32)).astype(x.dtype)


# Up to this many token copies, `blocked` indexes each copy's expert weights directly.
GATHER_MAX_COPIES = 16


def _blocked(x, topk_idx, topk_weight, w_gate, w_up, w_down, tile: int):
  n, k = topk_idx.shape
  e, d = w_gate.w.shape[0], x.shape[-1]
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
  y = _swiglu(xs, lambda lhs, w: tiled_gmm(lhs, w, tile_expert, used), w_gate, w_up, w_down)
  return jnp.einsum("nkd,nk->nd", y[pos].astype(jnp.float32),
                    topk_weight.astype(jnp.float32)).astype(x.dtype)


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
  if method == "pallas":
    # the kernel is interpreted where the program is lowered for the CPU
    return _sorted(x, topk_idx, topk_weight, w_gate, w_up, w_down, gmm)
  raise ValueError(f"moe dispatch method {method!r}: expected one of {METHODS}")
