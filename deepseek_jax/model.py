"""DeepSeek-V2/V3 causal LM in Flax NNX: decoder layers, final norm, head, and MTP modules.

Layer i is dense (SwiGLU) unless `cfg.is_moe_layer(i)`. With `cfg.scan_layers` the dense layers
and the MoE layers are each stacked along a leading axis and run with `nnx.scan` (equal outputs,
one compiled body per kind); with `cfg.remat` each layer is recomputed in the backward pass.
The runtime fields of the config (MoE dispatch, decode attention, remat) are read when the model
runs; `replace_config` gives the same weights under other runtime choices.

Multi-token prediction (DeepSeek-V3 section 2.2), depth k = 1..num_nextn_predict_layers:
  h^0_t   = the main model's final hidden state at t (after the final norm, as the public serving
            implementations feed it);
  h'^k_t  = eh_proj_k [ enorm_k(Emb(x_{t+k})) ; hnorm_k(h^{k-1}_t) ]   (embedding first: the order
            of the released `eh_proj` [D, 2D] as served by vLLM and SGLang; the paper writes the
            same concatenation with the operands the other way round);
  h^k_t   = Block_k(h'^k_{<=t})                                  (a full decoder layer, causal);
  logits^k_t = Head(shared_head_norm_k(h^k_t)), predicting x_{t+k+1}.
Emb and Head are shared with the main model. The last k positions have no x_{t+k}: they see a
padding id and their predictions must be masked by the loss.

Legend: B batch, T length, D hidden, V vocab, L layers.
"""

from __future__ import annotations

from typing import NamedTuple

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax.attention import LayerCache, MLAttention, StackedLayerCache, init_layer_cache
from deepseek_jax.attention import attention_mask as attention_mask_of
from deepseek_jax.config import LAYOUT_FIELDS, RUNTIME_FIELDS, DeepseekConfig
from deepseek_jax.layers import MLP, Embed, RMSNorm, linear
from deepseek_jax.moe import MoE, RouterOutput


class Cache(NamedTuple):
  """The MLA latent cache of the whole model (see `DeepseekForCausalLM.init_cache`)."""
  layers: tuple[LayerCache, ...]  # per decoder layer; with scan_layers per stack, stacked on axis 0
  mtp: tuple[LayerCache, ...]     # per MTP depth


class ModelOutput(NamedTuple):
  logits: jax.Array                    # [B, T, V] float32 ([B, P, V] with forward's logits_at)
  hidden: jax.Array                    # [B, T, D] after the final norm
  mtp_logits: tuple[jax.Array, ...]    # per depth k: [B, T, V] float32, position t predicts x_{t+k+1}
  router: tuple[RouterOutput, ...]     # per MoE layer in layer order, then the MTP blocks'
  cache: Cache | None = None           # the updated cache when one was passed in


def check_input_ids(input_ids, vocab_size: int) -> jax.Array:
  """input_ids as a jax array after checks that name what is wrong (ValueError).

  Always (static): a 2-D [batch, length] integer array (or nested list) with batch and length >= 1.
  Outside jit, every id must lie in [0, vocab_size): an id >= vocab_size would make its row's
  logits NaN, and a negative id would silently read the last embedding. Under jit (a traced
  array) the values are unknown and are not checked: callers that jit the model (generation,
  training) check their token ids on the host first.
  """
  if isinstance(input_ids, (list, tuple)):
    try:
      input_ids = np.asarray(input_ids)
    except ValueError as e:  # ragged nested lists
      raise ValueError(f"input_ids: not a rectangular [batch, length] array of ids ({e})") from None
  shape = tuple(np.shape(input_ids))
  if len(shape) != 2:
    hint = " (one sequence: wrap it as [ids])" if len(shape) == 1 else ""
    raise ValueError(f"input_ids: expected shape [batch, length], got {shape}{hint}")
  if 0 in shape:
    raise ValueError(f"input_ids: shape {shape} is empty; batch and length must be >= 1")
  if not hasattr(input_ids, "dtype"):
    input_ids = np.asarray(input_ids)
  dtype = np.dtype(input_ids.dtype)
  if not np.issubdtype(dtype, np.integer):
    raise ValueError(f"input_ids: expected integer token ids, got dtype {dtype}")
  if not isinstance(input_ids, jax.core.Tracer):  # concrete, even when closed over by a jit
    with jax.ensure_compile_time_eval():
      lo, hi = int(jnp.min(input_ids)), int(jnp.max(input_ids))
    if lo < 0 or hi >= vocab_size:
      ids = np.asarray(input_ids)
      b, t = (int(i) for i in np.argwhere((ids < 0) | (ids >= vocab_size))[0])
      raise ValueError(f"input_ids[{b}, {t}] = {ids[b, t]} is outside the vocabulary "
                       f"[0, {vocab_size})")
  return jnp.asarray(input_ids)


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); mlp is dense or MoE."""

  def __init__(self, cfg: DeepseekConfig, layer_idx: int, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.is_moe = cfg.is_moe_layer(layer_idx)
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.self_attn = MLAttention(cfg, rngs=rngs, **kw)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    if self.is_moe:
      self.mlp = MoE(cfg, rngs=rngs, **kw)
    else:
      self.mlp = MLP(cfg, cfg.intermediate_size, rngs=rngs, **kw)

  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array | None = None,
               absorb: bool = False, cache: LayerCache | StackedLayerCache | None = None,
               topk_idx: jax.Array | None = None, fresh_cache: bool = False
               ) -> tuple[jax.Array, RouterOutput | None, LayerCache | StackedLayerCache | None]:
    a, cache = self.self_attn(self.input_layernorm(x), positions, mask=mask, absorb=absorb,
                              cache=cache, fresh_cache=fresh_cache)
    x = x + a
    h = self.post_attention_layernorm(x)
    if self.is_moe:
      y, r = self.mlp(h, topk_idx)
      return x + y, r, cache
    return x + self.mlp(h), None, cache


class MTPLayer(nnx.Module):
  """One multi-token-prediction depth (see the module docstring for the equations)."""

  def __init__(self, cfg: DeepseekConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.eh_proj = linear(cfg, 2 * cfg.hidden_size, cfg.hidden_size, name="eh_proj", rngs=rngs,
                          **kw)
    self.block = DecoderLayer(cfg, cfg.num_hidden_layers, rngs=rngs, **kw)
    self.shared_head_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)

  def __call__(self, h_prev, emb_next, positions, mask=None, absorb=False, cache=None,
               fresh_cache=False):
    """Returns h^k [B, T, D], its normed copy for the head, the router output and the cache."""
    x = self.eh_proj(jnp.concatenate([self.enorm(emb_next), self.hnorm(h_prev)], axis=-1))
    h, r, cache = self.block(x, positions, mask, absorb, cache, fresh_cache=fresh_cache)
    return h, self.shared_head_norm(h), r, cache


def _stack(cfg, layer_idx, count, kw, rngs) -> DecoderLayer:
  """`count` identical layers (of the kind of `layer_idx`) with a leading stacked axis."""

  @nnx.split_rngs(splits=count)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(r):
    return DecoderLayer(cfg, layer_idx, rngs=r, **kw)

  return create(rngs)


def _scan_stack(stack: DecoderLayer, x, positions, mask, absorb, remat: bool, cache,
                topk_idx=None, fresh_cache=False):
  """Runs a stacked layer group; returns the output, stacked router outputs and stacked cache.
  `topk_idx` (routing replay) is stacked like the layers: [layers, B, T, K]."""
  def body(layer, h, c, k):
    return layer(h, positions, mask, absorb, c, k, fresh_cache=fresh_cache)

  if remat:
    body = nnx.remat(body)

  if cache is None:
    @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))
    def run(h, layer, k):
      h, r, _ = body(layer, h, None, k)
      return h, r

    h, r = run(x, stack, topk_idx)
    return h, r, None

  # The stacked cache [L, B, S, C|R] rides in the carry with the layer's index: each layer reads
  # its slice and writes its tokens into the carried buffer in place (`StackedLayerCache`). As a
  # per-layer input and output it would come back as a fresh stacked buffer, copied each step.
  @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))
  def run_cached(carry, layer, k):
    h, c = carry
    h, r, c = body(layer, h, c, k)
    return (h, c._replace(layer=c.layer + 1)), r

  (h, c), r = run_cached((x, StackedLayerCache(cache, jnp.int32(0))), stack, topk_idx)
  return h, r, c.stacked


class DeepseekForCausalLM(nnx.Module):
  """The causal LM; `model(input_ids)` gives float32 logits [B, T, V]."""

  def __init__(self, cfg: DeepseekConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = dtype
    self.param_dtype = param_dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.embed_tokens = Embed(cfg, rngs=rngs, **kw)
    if cfg.scan_layers:
      n_dense = cfg.num_dense_layers
      if n_dense:
        self.dense_layers = _stack(cfg, 0, n_dense, kw, rngs)
      if n_dense < cfg.num_hidden_layers:
        self.moe_layers = _stack(cfg, n_dense, cfg.num_hidden_layers - n_dense, kw, rngs)
    else:
      self.layers = nnx.List([DecoderLayer(cfg, i, rngs=rngs, **kw)
                              for i in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    if not cfg.tie_word_embeddings:
      self.lm_head = linear(cfg, cfg.hidden_size, cfg.vocab_size, name="lm_head", rngs=rngs, **kw)
    self.mtp = nnx.List([MTPLayer(cfg, rngs=rngs, **kw)
                         for _ in range(cfg.num_nextn_predict_layers)])

  # ------------------------------------------------------------------ pieces
  def embed(self, input_ids: jax.Array) -> jax.Array:
    return self.embed_tokens(input_ids)

  def head(self, h: jax.Array) -> jax.Array:
    """Float32 logits from normed hidden states [..., D]."""
    w = (self.embed_tokens.table().T if self.cfg.tie_word_embeddings
         else self.lm_head.merged_kernel())
    return jnp.einsum("...d,dv->...v", h, w.astype(h.dtype), preferred_element_type=jnp.float32)

  def stacks(self) -> list[DecoderLayer]:
    """The stacked layer groups of a scanned model, in order."""
    return [getattr(self, n) for n in ("dense_layers", "moe_layers") if hasattr(self, n)]

  def init_cache(self, batch: int, max_len: int, dtype=None) -> Cache:
    """An empty latent cache for `batch` sequences of up to `max_len` tokens."""
    cfg, dtype = self.cfg, dtype or self.dtype
    one = lambda: init_layer_cache(cfg, batch, max_len, dtype)
    if cfg.scan_layers:
      layers = tuple(jax.tree.map(lambda a, n=s.input_layernorm.scale.shape[0]: jnp.broadcast_to(
          a, (n,) + a.shape), one()) for s in self.stacks())
    else:
      layers = tuple(one() for _ in range(cfg.num_hidden_layers))
    return Cache(layers, tuple(one() for _ in range(len(self.mtp))))

  def decoder(self, x, positions, mask=None, absorb=False, cache=None, routing=None,
              fresh_cache=False):
    """All decoder layers over x [B, T, D]: the un-normed output, router outputs, layer caches.
    `routing`: per MoE layer, in order, the experts to use; `fresh_cache`: see `forward`."""
    routers: list[RouterOutput] = []
    new_cache: list[LayerCache] = []
    n_moe = sum(self.cfg.is_moe_layer(i) for i in range(self.cfg.num_hidden_layers))
    if routing is not None and len(routing) != n_moe:
      raise ValueError(f"routing: {len(routing)} topk_idx arrays for {n_moe} MoE layers")
    if self.cfg.scan_layers:
      for j, stack in enumerate(self.stacks()):
        replay = None
        if routing is not None and stack.is_moe:  # the MoE stack holds every MoE layer
          replay = jnp.stack(routing)
        x, r, c = _scan_stack(stack, x, positions, mask, absorb, self.cfg.remat,
                              None if cache is None else cache[j], replay, fresh_cache)
        new_cache.append(c)
        if r is not None:
          routers.extend(RouterOutput(*(a[i] for a in r)) for i in range(r.scores.shape[0]))
      return x, tuple(routers), tuple(new_cache)
    for i, layer in enumerate(self.layers):
      c = None if cache is None else cache[i]
      k = routing[len(routers)] if routing is not None and layer.is_moe else None
      if self.cfg.remat:
        x, r, c = nnx.remat(lambda l, h, c, k: l(h, positions, mask, absorb, c, k,
                                                 fresh_cache=fresh_cache))(layer, x, c, k)
      else:
        x, r, c = layer(x, positions, mask, absorb, c, k, fresh_cache=fresh_cache)
      new_cache.append(c)
      if r is not None:
        routers.append(r)
    return x, tuple(routers), tuple(new_cache)

  # ------------------------------------------------------------------ forward
  def forward(self, input_ids: jax.Array, *, positions: jax.Array | None = None,
              attention_mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
              absorb: bool = False, with_mtp: bool = True, cache: Cache | None = None,
              routing: tuple[jax.Array, ...] | None = None,
              logits_at: jax.Array | None = None, fresh_cache: bool = False) -> ModelOutput:
    """Forward over input_ids [B, T] (int). `attention_mask` [B, T] marks real (non-pad) tokens;
    `segment_ids` [B, T] (packed sequences) keep attention within a segment, and then
    `positions` should restart in each (`chat.segment_positions`); `positions` default to
    0..T-1. With a `cache` (see `MLAttention.__call__`) the tokens' latents are stored at their
    positions and the updated cache is returned. `routing` (routing replay, for RL): one int
    topk_idx [B, T, K] per MoE decoder layer in layer order (as `ModelOutput.router` lists
    them), the experts each token uses instead of the router's choice; the weights still come
    from the router (`moe.route`). The MTP blocks always route themselves. `logits_at` [B, P]
    (int indices into T): the main head only at those positions, logits [B, P, V] (a prefill
    wants one position per row; the head over all of them is a [B, T, V] float32 product, half
    a GB per 1K tokens at V3's vocabulary). `fresh_cache` (a prefill): the cache is empty, has T
    slots and positions are 0..T-1; attention then skips each query block's later keys, as
    without a cache (`MLAttention.__call__`). Ids are checked by `check_input_ids` (their values
    only outside jit)."""
    input_ids = check_input_ids(input_ids, self.cfg.vocab_size)
    b, t = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = None
    if attention_mask is not None or segment_ids is not None:
      valid = None if attention_mask is None else attention_mask.astype(jnp.bool_)
      mask = attention_mask_of(positions, positions, valid, segment_ids, segment_ids)
    x = self.embed(input_ids)  # [B, T, D]
    x, routers, layer_cache = self.decoder(x, positions, mask, absorb,
                                           None if cache is None else cache.layers, routing,
                                           fresh_cache)
    hidden = self.norm(x)
    if logits_at is None:
      logits = self.head(hidden)                                            # [B, T, V]
    else:
      logits = self.head(jnp.take_along_axis(hidden, logits_at[..., None], axis=1))  # [B, P, V]
    mtp_logits, mtp_cache = [], []
    if with_mtp and len(self.mtp):
      h = hidden
      for k, layer in enumerate(self.mtp, start=1):
        shifted = jnp.pad(input_ids[:, k:], ((0, 0), (0, k)))  # x_{t+k}; padding for the last k
        c = None if cache is None else cache.mtp[k - 1]
        h, normed, r, c = layer(h, self.embed(shifted), positions, mask, absorb, c,
                                fresh_cache=fresh_cache and c is not None)
        mtp_logits.append(self.head(normed))
        mtp_cache.append(c)
        routers = routers + ((r,) if r is not None else ())
    new_cache = None
    if cache is not None:
      new_cache = Cache(layer_cache, tuple(mtp_cache) if mtp_cache else cache.mtp)
    return ModelOutput(logits, hidden, tuple(mtp_logits), routers, new_cache)

  def __call__(self, input_ids: jax.Array, **kw) -> jax.Array:
    """Float32 logits [B, T, V] for int input_ids [B, T]."""
    return self.forward(input_ids, with_mtp=False, **kw).logits


# Whether `seeded_model` draws its keys concretely when traced. jax before 0.12 builds a traced
# value's origin message (a walk over the whole trace so far) whenever a missing attribute is read,
# and flax reads the missing `sharding` of the traced key counter on every draw: tracing a model
# was quadratic in its size (the full V3's abstract model: 6.7 s on jax 0.10.2, 1.2 s with keys
# drawn concretely). From jax 0.12 that read is cheap, and eager draws would only add their
# dispatch (1.0 s -> 1.5 s).
CONCRETE_KEYS = jax.__version_info__ < (0, 12)


def seeded_model(cfg: DeepseekConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 seed: int = 0) -> DeepseekForCausalLM:
  """A freshly initialised model from `seed`, the same as `DeepseekForCausalLM(cfg,
  rngs=nnx.Rngs(seed))`, that traces (`nnx.eval_shape` for the abstract model, `jax.jit` for a
  sharded one) in time linear in its size: with `CONCRETE_KEYS` its keys are drawn before
  tracing (`layers.param_key`)."""
  with jax.ensure_compile_time_eval() if CONCRETE_KEYS else contextlib.nullcontext():
    rngs = nnx.Rngs(seed)
  return DeepseekForCausalLM(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


@functools.lru_cache(maxsize=32)
def _graphdef(cfg: DeepseekConfig, dtype, param_dtype):
  return nnx.split(nnx.eval_shape(lambda: seeded_model(cfg, dtype=dtype,
                                                       param_dtype=param_dtype)))[0]


def replace_config(model: DeepseekForCausalLM, **runtime) -> DeepseekForCausalLM:
  """A model over the same arrays (not copied) whose config has other runtime fields
  (`moe_dispatch`, `mla_decode`, `remat`, `lora_alpha`, `router_dtype`); the given model is left
  as it is."""
  allowed = set(RUNTIME_FIELDS) - set(LAYOUT_FIELDS)
  bad = sorted(set(runtime) - allowed)
  if bad:
    raise ValueError(f"replace_config: {bad} are not runtime fields that keep the variables "
                     f"(allowed: {sorted(allowed)})")
  cfg = model.cfg.replace(**runtime)
  if cfg == model.cfg:
    return model
  return nnx.merge(_graphdef(cfg, model.dtype, model.param_dtype), nnx.state(model))
