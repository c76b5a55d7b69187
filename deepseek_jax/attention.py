"""Multi-head Latent Attention (MLA), DeepSeek-V2 section 2.1.

Per token, queries come from a low-rank projection (q_a, its norm, q_b) or a full one
(`q_lora_rank` null); keys and values come from ONE compressed latent c_kv = norm(W_kv_a x) of
width `kv_lora_rank` plus ONE shared rope key k_pe (decoupled RoPE). Heads expand the latent with
W_kv_b = [W_uk | W_uv]:

  k_h = [W_uk,h c_kv ; k_pe]      v_h = W_uv,h c_kv      q_h = [q_nope,h ; rope(q_pe,h)]
  score_h(t, s) = scale * (q_nope,h(t) . W_uk,h c_kv(s) + q_pe,h(t) . k_pe(s))

Two equal ways to compute it:
- expanded: materialise k_h and v_h per head (cheap for long prefills, the reference layout);
- absorbed: fold W_uk into the query (q_lat,h = W_uk,hᵀ q_nope,h), attend over the latent itself,
  and apply W_uv after the weighted sum; only c_kv and k_pe are ever read (decoding). A decode
  step (one token per sequence) can run it through the Pallas flash-decoding kernel
  (`cfg.mla_decode`; by default on TPUs and GPUs); elsewhere `attend_step` reads the cache once
  per product as it came in, and the token's latents are written in place after (into the
  layer's cache, or under `scan_layers` into the stack's carried cache: `StackedLayerCache`).
Training and prefill attend by blocks of queries (`_query_blocks`); without a cache no token sees
a later one in the sequence, whatever its position.

Legend: B batch, T query length, S key length, D hidden, H heads, C kv_lora_rank,
N qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.config import DeepseekConfig
from deepseek_jax.kernels_pallas import mla_decode_attention
from deepseek_jax.layers import RMSNorm, apply_rope, linear, rope_cos_sin

_NEG_INF = -1e30


class LayerCache(NamedTuple):
  """One layer's MLA cache: per token only the normed latent and the rotated rope key."""
  c_kv: jax.Array  # [B, S, C]
  k_pe: jax.Array  # [B, S, R]

  def read(self) -> LayerCache:
    """The layer's cache to attend over: itself."""
    return self

  def write(self, c_kv: jax.Array, k_pe: jax.Array, positions: jax.Array) -> LayerCache:
    """The cache with the tokens' latents [B, T, C|R] at their positions [B, T]."""
    return write_cache(self, c_kv, k_pe, positions)


class StackedLayerCache(NamedTuple):
  """Layer `layer` of a layer stack's cache, as the scan over stacked layers carries it
  (`model._scan_stack`): reads give that layer's [B, S, C|R] view, writes go into the stacked
  buffer in place. (A scan that took the stacked cache as per-layer inputs and gave it back as
  per-layer outputs would build a fresh stacked buffer and copy into it at every step.) On
  XLA:CPU the view is itself a copy of the layer's slice: its matmuls take no sliced operand."""
  stacked: LayerCache  # [L, B, S, C|R]
  layer: jax.Array     # int32 scalar, the index into L

  def read(self) -> LayerCache:
    """The layer's cache [B, S, C|R]."""
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, self.layer, keepdims=False),
                        self.stacked)

  def write(self, c_kv: jax.Array, k_pe: jax.Array, positions: jax.Array) -> StackedLayerCache:
    """The stack's cache with the tokens' latents [B, T, C|R] at [layer, b, positions[b]]."""
    return self._replace(stacked=write_cache(self.stacked, c_kv, k_pe, positions, self.layer))


def init_layer_cache(cfg: DeepseekConfig, batch: int, max_len: int, dtype=jnp.float32) -> LayerCache:
  return LayerCache(jnp.zeros((batch, max_len, cfg.kv_lora_rank), dtype),
                    jnp.zeros((batch, max_len, cfg.qk_rope_head_dim), dtype))


def write_cache(cache: LayerCache, c_kv: jax.Array, k_pe: jax.Array, positions: jax.Array,
                layer: jax.Array | None = None) -> LayerCache:
  """Stores each token's latents c_kv [B, T, C] and k_pe [B, T, R] at its own position
  (per sequence) in a layer's cache [B, S, C|R], or with `layer` in that layer of a stacked
  cache [L, B, S, C|R]; positions past the end drop."""
  b = jnp.arange(positions.shape[0])[:, None]
  at = (b, positions) if layer is None else (layer, b, positions)
  return LayerCache(cache.c_kv.at[at].set(c_kv.astype(cache.c_kv.dtype), mode="drop"),
                    cache.k_pe.at[at].set(k_pe.astype(cache.k_pe.dtype), mode="drop"))


def attention_mask(q_positions: jax.Array, k_positions: jax.Array,
                   k_valid: jax.Array | None = None, q_segments: jax.Array | None = None,
                   k_segments: jax.Array | None = None) -> jax.Array:
  """Causal mask [B, 1, T, S]: key s is visible from query t when pos(s) <= pos(t), s is valid,
  and (packed sequences) s and t are in the same segment."""
  mask = k_positions[:, None, :] <= q_positions[:, :, None]  # [B, T, S]
  if k_valid is not None:
    mask = mask & k_valid[:, None, :]
  if q_segments is not None:
    mask = mask & (k_segments[:, None, :] == q_segments[:, :, None])
  return mask[:, None]


def _query_blocks(t: int, s: int, causal: bool) -> list[tuple[int, int, int]]:
  """Query rows [a, b) and the keys [0, end) each block of a T x S attention reads.

  Long attentions go by blocks of queries: each block's float32 scores and probabilities stay
  small enough for the CPU's caches (one [B, H, T, S] product and its softmax, forward and
  backward, cost 1.4x to 2x more at 256 tokens and 2.6x to 4.7x at 1K to 4K, measured with
  bench/attention.py's shapes), and with `causal` (no query
  sees a key after it in the sequence, T == S) a block reads only the keys up to its last query,
  about half the products. Up to 128 rows, one block; then 4 to 16 blocks, a multiple of 8 rows.
  """
  if t <= 128:
    blocks = [(0, t)]
  else:
    rows = _round_up(-(-t // min(max(t // 128, 4), 16)), 8)
    blocks = [(a, min(a + rows, t)) for a in range(0, t, rows)]
  return [(a, b, min(b, s) if causal else s) for a, b in blocks]


def _block_mask(mask: jax.Array, a: int, b: int, end: int, causal: bool) -> jax.Array:
  """mask [B, 1, T, S] for queries [a, b) and keys [0, end); with `causal`, also no key after
  its query."""
  m = mask[:, :, a:b, :end]
  if causal:
    m = m & (jnp.arange(a, b)[:, None] >= jnp.arange(end)[None])
  return m


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def use_decode_kernel(cfg: DeepseekConfig, platform: str | None = None) -> bool:
  """Whether absorbed decode steps use the Pallas MLA kernel: `cfg.mla_decode`, where "auto" means
  on TPUs and GPUs (Mosaic TPU or Triton; on the CPU, where Pallas only interprets, XLA's
  einsums serve)."""
  if cfg.mla_decode == "auto":
    return (platform or jax.default_backend()) in ("tpu", "gpu", "cuda", "rocm")
  return cfg.mla_decode == "pallas"


class AbsorbedWeight(nnx.Variable):
  """W_uk or W_uv laid out for the absorbed products, computed from kv_b_proj before a decode
  loop (`hoist_absorbed_weights`): derived, never trained or saved."""


def absorbed_weights(cfg: DeepseekConfig, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
  """W_uk [..., C, H, N] and W_uv [..., C, H, V] from kv_b_proj's kernel [..., C, H*(N+V)] (a
  stacked kernel keeps its leading layer axis)."""
  w = kernel.reshape(*kernel.shape[:-1], cfg.num_attention_heads,
                     cfg.qk_nope_head_dim + cfg.v_head_dim)
  return w[..., :cfg.qk_nope_head_dim], w[..., cfg.qk_nope_head_dim:]


def hoist_absorbed_weights(model: nnx.Module) -> None:
  """Gives every MLA module of `model` (stacked ones too) W_uk as [..., H, C, N] and W_uv as
  [..., H, V, C], as `AbsorbedWeight` variables that `_w_kv_b` then reads: heads leading and the
  contracted axis last, the operand layouts XLA:CPU's batched matmuls of the absorbed products
  take without a copy.

  Why: read from kv_b_proj's kernel, each absorbed decode step transposed both out of it again
  (XLA does not hoist the transposes out of the decode loop, though their operand is
  loop-invariant): 1.9 ms of a 23 ms batch-8 step of bench/generate.py's model. Called inside the
  jitted decode before its loop, the copies are made once per loop; they hold kv_b_proj's
  weights once more, in the compute dtype (dequantized, with a LoRA adapter merged)."""
  for _, m in nnx.iter_graph(model):
    if isinstance(m, MLAttention):
      uk, uv = absorbed_weights(m.cfg, m.kv_b_proj.merged_kernel())  # [..., C, H, N|V]
      # the barrier keeps XLA from cancelling these transposes against `_w_kv_b`'s views
      uk, uv = jax.lax.optimization_barrier((jnp.swapaxes(uk, -3, -2),  # [..., H, C, N]
                                             jnp.moveaxis(uv, -3, -1)))  # [..., H, V, C]
      m.absorbed_uk, m.absorbed_uv = AbsorbedWeight(uk), AbsorbedWeight(uv)


class MLAttention(nnx.Module):
  """MLA with the released parameter names; `absorb` picks the computation, not the result."""

  def __init__(self, cfg: DeepseekConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    h, d = cfg.num_attention_heads, cfg.hidden_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    norm_kw = dict(dtype=dtype, param_dtype=param_dtype)
    if cfg.q_lora_rank is None:
      self.q_proj = linear(cfg, d, h * cfg.qk_head_dim, name="self_attn.q_proj", **kw)
    else:
      self.q_a_proj = linear(cfg, d, cfg.q_lora_rank, bias=cfg.attention_bias,
                             name="self_attn.q_a_proj", **kw)
      self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, **norm_kw)
      self.q_b_proj = linear(cfg, cfg.q_lora_rank, h * cfg.qk_head_dim,
                             name="self_attn.q_b_proj", **kw)
    self.kv_a_proj_with_mqa = linear(cfg, d, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                     bias=cfg.attention_bias,
                                     name="self_attn.kv_a_proj_with_mqa", **kw)
    self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, **norm_kw)
    self.kv_b_proj = linear(cfg, cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                            name="self_attn.kv_b_proj", **kw)
    self.o_proj = linear(cfg, h * cfg.v_head_dim, d, bias=cfg.attention_bias,
                         name="self_attn.o_proj", **kw)

  # ------------------------------------------------------------------ projections
  def queries(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
    """q_nope [B, T, H, N] and rotated q_pe [B, T, H, R]."""
    cfg = self.cfg
    if cfg.q_lora_rank is None:
      q = self.q_proj(x)
    else:
      q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
    q = q.reshape(*x.shape[:-1], cfg.num_attention_heads, cfg.qk_head_dim)
    q_nope, q_pe = q[..., :cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]
    return q_nope, apply_rope(q_pe, cos, sin, interleaved=cfg.rope_interleave)

  def latents(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
    """What MLA caches per token: the normed latent c_kv [B, T, C] and the rotated k_pe [B, T, R]."""
    cfg = self.cfg
    kv = self.kv_a_proj_with_mqa(x)
    c_kv = self.kv_a_layernorm(kv[..., :cfg.kv_lora_rank])
    k_pe = apply_rope(kv[..., cfg.kv_lora_rank:], cos, sin, interleaved=cfg.rope_interleave)
    return c_kv, k_pe

  def _w_kv_b(self) -> tuple[jax.Array, jax.Array]:
    """W_uk [C, H, N] and W_uv [C, H, V] from kv_b_proj's kernel [C, H*(N+V)], or views of the
    copies laid out for the absorbed products (`hoist_absorbed_weights`)."""
    if hasattr(self, "absorbed_uk"):
      return (jnp.swapaxes(self.absorbed_uk[...], -3, -2),    # [H, C, N] -> [C, H, N]
              jnp.moveaxis(self.absorbed_uv[...], -1, -3))    # [H, V, C] -> [C, H, V]
    return absorbed_weights(self.cfg, self.kv_b_proj.merged_kernel())

  # ------------------------------------------------------------------ attention
  def attend_expanded(self, q_nope, q_pe, c_kv, k_pe, mask, causal: bool = False) -> jax.Array:
    """Expanded MLA: per-head keys and values from the latent. Returns [B, T, H, V].
    `causal`: see `_query_blocks`."""
    cfg = self.cfg
    kv = self.kv_b_proj(c_kv).reshape(*c_kv.shape[:-1], cfg.num_attention_heads, -1)
    k_nope, v = kv[..., :cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim:]  # [B, S, H, N|V]
    # One score product over [nope ; rope] (k_pe shared by the heads, broadcast): summing two
    # products would write two [B, H, T, S] float32 score tensors and add them, forward and
    # backward. Heads lead (the products' batch axes first), as XLA:CPU's batched GEMMs want.
    q = jnp.concatenate([q_nope, q_pe.astype(q_nope.dtype)], axis=-1)          # [B, T, H, N+R]
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe[:, :, None].astype(k_nope.dtype),
                                                  (*k_nope.shape[:-1], k_pe.shape[-1]))],
                        axis=-1)                                                 # [B, S, H, N+R]
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))                      # [B, H, T|S, ·]
    outs = []
    for a, b, end in _query_blocks(q.shape[2], k.shape[2], causal):
      scores = jnp.einsum("bhtd,bhsd->bhts", q[:, :, a:b], k[:, :, :end],
                          preferred_element_type=jnp.float32)
      probs = self._softmax(scores, _block_mask(mask, a, b, end, causal))
      outs.append(jnp.einsum("bhts,bhsv->bhtv", probs.astype(v.dtype), v[:, :, :end]))
    return jnp.concatenate(outs, axis=2).transpose(0, 2, 1, 3)                  # [B, T, H, V]

  def attend_absorbed(self, q_nope, q_pe, c_kv, k_pe, mask, causal: bool = False) -> jax.Array:
    """Absorbed MLA: attention over the latent itself, W_uk and W_uv folded in. Returns [B, T, H, V].
    `causal`: see `_query_blocks`."""
    w_uk, w_uv = self._w_kv_b()
    q_lat = jnp.einsum("bthn,chn->bthc", q_nope, w_uk)  # [B, T, H, C]
    f32 = dict(preferred_element_type=jnp.float32)
    outs = []
    for a, b, end in _query_blocks(q_lat.shape[1], c_kv.shape[1], causal):
      scores = (jnp.einsum("bthc,bsc->bhts", q_lat[:, a:b], c_kv[:, :end], **f32)
                + jnp.einsum("bthr,bsr->bhts", q_pe[:, a:b], k_pe[:, :end], **f32))
      probs = self._softmax(scores, _block_mask(mask, a, b, end, causal))
      outs.append(jnp.einsum("bhts,bsc->bthc", probs.astype(c_kv.dtype), c_kv[:, :end]))
    o_lat = jnp.concatenate(outs, axis=1)  # [B, T, H, C]
    return jnp.einsum("bthc,chv->bthv", o_lat, w_uv)

  def attend_step(self, q_nope, q_pe, c_new, k_new, cache: LayerCache, positions
                  ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Absorbed MLA for one new token per sequence (a decode step on the XLA path): attends the
    cache slots before its position and itself; the caller then writes the token's latents into
    the cache in place (`LayerCache.write`, or `StackedLayerCache.write` into a scanned stack's
    buffer). Returns [B, 1, H, V] (what `attend_absorbed` gives over the written cache), the
    latents to write (c_new [B, 1, C], k_new [B, 1, R], in the cache's dtype) and the positions
    [B, 1] to write them at.

    Why not write first and attend over the written cache: XLA:CPU then duplicates the write at
    batch 1 (one in-place update for the returned cache, one fused into the score product's
    operand), each on its own full copy of the layer's cache, and transposes the cache for the
    value product. Here the products read the cache as it came in, once each, in its own layout
    [B, S, C], and the new token's own score and value come from c_new and k_new. XLA orders an
    in-place write after the reads of its operand only when they are its data ancestors (CPU
    drops optimization barriers before copy insertion), else it copies the cache; so the
    returned positions depend on the attention output through a term that is always 0 (no
    value is above +inf, NaN compares false).
    """
    w_uk, w_uv = self._w_kv_b()
    c_kv, k_pe = cache.c_kv.astype(self.dtype), cache.k_pe.astype(self.dtype)  # [B, S, C|R]
    # the token's own latents as the cache will hold them (rounded to its dtype, if another)
    c_new = c_new.astype(cache.c_kv.dtype)  # [B, 1, C]
    k_new = k_new.astype(cache.k_pe.dtype)  # [B, 1, R]
    c_own, k_own = c_new.astype(self.dtype), k_new.astype(self.dtype)  # [B, 1, C|R] to compute
    q_lat = jnp.einsum("bthn,chn->bthc", q_nope, w_uk)  # [B, 1, H, C]
    f32 = dict(preferred_element_type=jnp.float32)
    old = (jnp.einsum("bthc,bsc->bhts", q_lat, c_kv, **f32)
           + jnp.einsum("bthr,bsr->bhts", q_pe, k_pe, **f32))      # [B, H, 1, S]
    own = (jnp.einsum("bthc,btc->bht", q_lat, c_own, **f32)
           + jnp.einsum("bthr,btr->bht", q_pe, k_own, **f32))[..., None]  # [B, H, 1, 1]
    before = jnp.arange(c_kv.shape[1], dtype=positions.dtype)[None] < positions  # [B, S]
    old = jnp.where(before[:, None, None], old, _NEG_INF)
    probs = jax.nn.softmax(jnp.concatenate([old, own], axis=-1) * self.cfg.softmax_scale,
                           axis=-1)                                  # [B, H, 1, S+1] float32
    o_lat = (jnp.einsum("bhts,bsc->bhtc", probs[..., :-1].astype(c_kv.dtype), c_kv)
             + probs[..., -1:].astype(c_own.dtype) * c_own[:, None])  # [B, H, 1, C]
    after = (o_lat[:, 0, :, 0] > jnp.inf).astype(positions.dtype)   # [B, 1], always 0
    return jnp.einsum("bhtc,chv->bthv", o_lat, w_uv), c_new, k_new, positions + after

  def attend_decode_kernel(self, q_nope, q_pe, c_kv, k_pe, lengths) -> jax.Array:
    """Absorbed MLA for one new token per sequence through the Pallas flash-decoding kernel
    (`kernels_pallas.mla_decode_attention`): attends cache slots [0, lengths[b]). Returns
    [B, 1, H, V], what `attend_absorbed` gives for the same step."""
    w_uk, w_uv = self._w_kv_b()
    q_lat = jnp.einsum("bhn,chn->bhc", q_nope[:, 0], w_uk)                 # [B, H, C]
    q = jnp.concatenate([q_lat, q_pe[:, 0].astype(q_lat.dtype)], axis=-1)  # [B, H, C+R]
    latent = jnp.concatenate([c_kv, k_pe.astype(c_kv.dtype)], axis=-1)    # [B, S, C+R]
    o_lat = mla_decode_attention(q, latent, lengths, kv_lora_rank=self.cfg.kv_lora_rank,
                                 softmax_scale=self.cfg.softmax_scale)    # [B, H, C]
    return jnp.einsum("bhc,chv->bhv", o_lat, w_uv)[:, None]

  def _softmax(self, scores: jax.Array, mask: jax.Array) -> jax.Array:
    scores = jnp.where(mask, scores * self.cfg.softmax_scale, _NEG_INF)
    return jax.nn.softmax(scores, axis=-1)  # float32

  def output(self, o: jax.Array) -> jax.Array:
    """o_proj over the concatenated heads: [B, T, H, V] -> [B, T, D]."""
    return self.o_proj(o.reshape(*o.shape[:-2], -1))

  def __call__(self, x: jax.Array, positions: jax.Array, *, mask: jax.Array | None = None,
               absorb: bool = False, cache: LayerCache | StackedLayerCache | None = None,
               fresh_cache: bool = False
               ) -> tuple[jax.Array, LayerCache | StackedLayerCache | None]:
    """Self-attention over x [B, T, D] at integer positions [B, T]; returns [B, T, D] and the cache.

    Without a cache each token attends to itself and the tokens before it in the sequence (never
    a later one, as transformers' causal mask), of those the ones `mask` [B, 1, T, T] allows
    when given (see `attention_mask`: padding, packed segments), else those at or before its
    position. With one, their latents are first written at their positions, and they attend
    over every cached slot at or before their own position: each sequence's positions must be
    contiguous from 0 (right padding), so all such slots hold its real tokens. `fresh_cache`
    (a prefill): the cache holds nothing yet, has T slots and positions are 0..T-1, so each
    block of queries reads only the keys up to its last query, as without a cache.
    """
    if fresh_cache and (cache is None or cache.read().c_kv.shape[1] != x.shape[1]):
      raise ValueError("fresh_cache: needs a cache of as many slots as tokens "
                       f"({x.shape[1]}), positions 0..T-1")
    cos, sin = rope_cos_sin(self.cfg, positions)
    q_nope, q_pe = self.queries(x, cos, sin)
    c_kv, k_pe = self.latents(x, cos, sin)
    if cache is None:
      mask = attention_mask(positions, positions) if mask is None else mask
    elif absorb and x.shape[1] == 1 and not use_decode_kernel(self.cfg):
      o, c_kv, k_pe, at = self.attend_step(q_nope, q_pe, c_kv, k_pe, cache.read(), positions)
      return self.output(o), cache.write(c_kv, k_pe, at)
    else:
      cache = cache.write(c_kv, k_pe, positions)
      view = cache.read()
      c_kv, k_pe = view.c_kv.astype(self.dtype), view.k_pe.astype(self.dtype)
      slots = jnp.broadcast_to(jnp.arange(c_kv.shape[1], dtype=positions.dtype),
                               (positions.shape[0], c_kv.shape[1]))
      mask = attention_mask(positions, slots)
      if absorb and x.shape[1] == 1 and use_decode_kernel(self.cfg):
        # one token per sequence at positions[:, 0]: it sees slots 0 .. position (right padding)
        o = self.attend_decode_kernel(q_nope, q_pe, c_kv, k_pe, positions[:, 0] + 1)
        return self.output(o), cache
    attend = self.attend_absorbed if absorb else self.attend_expanded
    causal = cache is None or fresh_cache
    return self.output(attend(q_nope, q_pe, c_kv, k_pe, mask, causal=causal)), cache
