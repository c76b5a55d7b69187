"""Fast generation over the MLA latent cache: one jitted prefill, a jitted `lax.while_loop` decode.

Layout of a batch (RIGHT padding): prompt b's tokens sit at positions 0..len_b-1 and its cache
slots hold exactly those; the prompt batch is padded to a length bucket (`bucket`) with id 0.
The pad tokens of the prefill write garbage latents at slots >= len_b. That is harmless: a token
at position p writes its own slot p before attending, and attends only to slots <= p, so every
garbage slot is overwritten before anyone reads it. Generated token i of sequence b sits at
position len_b + i.

Compilation: the prefill compiles once per (prompt bucket, batch, cache length, settings); the
decode loop once per (batch, cache length, settings). The number of new tokens, the EOS id and
the number of loop steps per call are traced values, so streaming in chunks reuses one program.
The cache length defaults to bucket(longest prompt) + bucket(max_new_tokens).

Chunked prefill (`prefill_chunk`): the prompt bucket runs through the model `prefill_chunk` tokens
at a time (a `lax.scan` over chunks), each chunk writing its latents into the full-length cache and
attending over it, so a long prompt's activations (scores [B, H, chunk, S], the chunk's logits
[B, chunk, V], the routed experts' copies) are bounded by the chunk, not the prompt. Only the
last prompt token's logits are kept. Same result as the one-shot prefill, up to float rounding.

Attention paths: decoding always uses the absorbed MLA path (it reads only the latent); the
prefill uses the expanded path from `ABSORB_PREFILL_BELOW` tokens up (see bench/generate.py),
unless `absorb` forces one path for both.

Self-speculative decoding (greedy, MTP depth 1): each loop step feeds [token, draft] at positions
[p, p+1]. The main model's argmax g0 at p is always right; when g0 equals the draft, g1 (its
argmax at p+1) is right too, so one step emits 2 tokens, else 1. The MTP block then runs over
the same two positions with the main hidden states and the embeddings of [g0, g1]; its
prediction at the last correct position is the next draft. Rejected slots (main at p+1, MTP at
p+1) are overwritten by the next step before they are read, as with padding. Outputs equal plain
greedy decoding up to float rounding between a 1-token and a 2-token step.

Sampling for RL (`num_samples`, `return_logprobs`, `record_routing`):
- G samples of each prompt share ONE prefill: the P prompts run through the model once, then
  every cache array, the last logits and the lengths are repeated G times along the batch
  (`jnp.repeat`, so row p*G + g is sample g of prompt p); the G rows draw different noise from
  the first token on.
- Each emitted token's log-probability under the distribution it was drawn from (temperature,
  then top-k and top-p: `sampling.sample_with_logprob`) is kept beside it ([B, N] float32).
- Each fed token's expert choice in every MoE layer is kept at its position ([B, S, K] int32 per
  layer; slots never fed hold the prefill's choice for a pad token or experts 0..K-1), so a
  learner can run the same sequences through the same experts (`model.forward(routing=...)`).
- A sequence stops at its EOS (kept) or after max_new_tokens; `count` says how many tokens it has
  and is the mask of its completion.

Legend: B batch, P prompts, G samples per prompt, T prompt bucket, S cache length, N new-token
capacity, V vocab, K experts per token.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax.attention import hoist_absorbed_weights
from deepseek_jax.model import Cache, replace_config
from deepseek_jax.sampling import SamplingParams, sample_with_logprob

# Prompts shorter than this (tokens, bucketed) are prefilled with the absorbed path (measured with
# bench/generate.py --prefill_sweep; see the module docstring).
ABSORB_PREFILL_BELOW = 128
MIN_BUCKET = 16

# Times each jitted function was traced (a test checks that buckets prevent recompilation).
TRACE_COUNTS: collections.Counter = collections.Counter()


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
  """Padded length for n: a power of two up to 512, then a multiple of 512."""
  n = max(int(n), minimum)
  if n <= 512:
    return 1 << (n - 1).bit_length()
  return -(-n // 512) * 512


# ---------------------------------------------------------------------------------------- inputs
def prepare_prompts(prompt_ids: Any, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded int32 [B, T] (T = bucket(longest)) and lengths [B] from lists or an array.

  `prompt_ids` is a list of lists of ints (any lengths), one list of ints (one prompt), or an
  integer array [B, T] / [T] whose rows are all full-length prompts.
  """
  if isinstance(prompt_ids, (np.ndarray, jax.Array)):
    arr = np.asarray(prompt_ids)
    if arr.ndim == 1:
      arr = arr[None]
    if arr.ndim != 2:
      raise ValueError(f"prompt_ids: expected an int array [B, T], got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f"prompt_ids: expected integer token ids, got dtype {arr.dtype}")
    prompts = [list(map(int, row)) for row in arr]
  else:
    prompts = list(prompt_ids)
    if prompts and not isinstance(prompts[0], (list, tuple, np.ndarray)):
      prompts = [prompts]
    prompts = [list(p) for p in prompts]
  if not prompts:
    raise ValueError("prompt_ids: the batch is empty")
  for b, p in enumerate(prompts):
    if not p:
      raise ValueError(f"prompt_ids[{b}] is empty: every prompt needs at least one token")
    for t in p:
      if not isinstance(t, (int, np.integer)) or isinstance(t, bool):
        raise ValueError(f"prompt_ids[{b}]: token {t!r} is not an integer id")
    bad = [t for t in p if not 0 <= t < vocab_size]
    if bad:
      raise ValueError(f"prompt_ids[{b}]: token id {bad[0]} is outside the vocabulary "
                       f"[0, {vocab_size})")
  lengths = np.array([len(p) for p in prompts], np.int32)
  tokens = np.zeros((len(prompts), bucket(lengths.max())), np.int32)
  for b, p in enumerate(prompts):
    tokens[b, :len(p)] = p
  return tokens, lengths


# ---------------------------------------------------------------------------------------- state
class DecodeState(NamedTuple):
  """The decode loop's carry (a pytree); row b is sequence b."""
  cache: Cache
  token: jax.Array     # [B] int32 last emitted token, not yet fed to the model
  pos: jax.Array       # [B] int32 its position
  draft: jax.Array     # [B] int32 MTP's guess for the token at pos+1 (speculative only)
  out: jax.Array       # [B, N+1] int32 emitted tokens (the first comes from the prefill)
  count: jax.Array     # [B] int32 tokens emitted
  done: jax.Array      # [B] bool: emitted EOS or max_new tokens
  step: jax.Array      # [] int32 decode steps taken (keys the sampling noise)
  verify: jax.Array    # [B] int32 speculative steps taken while running
  accepted: jax.Array  # [B] int32 drafts accepted
  logits: jax.Array | None  # [B, N, V] float32 logits of each emitted token (record_logits only)
  logprobs: jax.Array | None  # [B, N] float32 log-probability of each emitted token (logprobs only)
  routes: tuple | None     # per MoE layer [B, S, K] int32 experts of each fed token (record_routing)


class _Static(NamedTuple):
  """Compile-time settings of a generation (hashable)."""
  sampling: SamplingParams
  absorb_prefill: bool
  absorb_decode: bool
  speculative: bool
  record_logits: bool
  prefill_chunk: int | None = None
  logprobs: bool = False       # keep each token's log-probability
  group: int = 1               # samples per prompt, sharing one prefill
  record_routing: bool = False  # keep each fed token's experts


def _merge(graphdef, state):
  """The model for the current trace level (a fresh copy of the state's Variables, as NNX
  transforms such as scan_layers' nnx.scan refuse Variables made at an outer level)."""
  return nnx.merge(graphdef, jax.tree.map(lambda a: a, state))


def _emit(out, index, tokens, mask):
  """out [B, N+1] with tokens [B] written at column index [B] in the rows where mask [B]."""
  rows = jnp.arange(out.shape[0])
  idx = jnp.where(mask, index, out.shape[1])  # out of range: dropped
  return out.at[rows, idx].set(tokens, mode="drop")


def _initial_routes(router, k: int, cache_len: int, group: int) -> tuple:
  """The prefill's expert choices [P, T, K] per MoE layer, widened to [P*G, S, K] (experts 0..K-1
  in the slots past the prompt bucket, until a fed token writes its own)."""
  out = []
  for r in router:
    p, t, _ = r.topk_idx.shape
    buf = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (p, cache_len, k))
    buf = buf.at[:, :t].set(r.topk_idx.astype(jnp.int32))
    out.append(jnp.repeat(buf, group, axis=0))
  return tuple(out)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "new_cap", "st"))
def _prefill(graphdef, state, tokens, lengths, max_new, eos_id, key, *, cache_len: int,
             new_cap: int, st: _Static) -> DecodeState:
  TRACE_COUNTS["prefill"] += 1
  model = _merge(graphdef, state)
  b, t = tokens.shape
  rows = jnp.arange(b)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  # Prefill into a cache of the bucket's length (attention over T, not S slots), then widen it.
  last = lengths - 1
  routes = None
  if st.prefill_chunk and t > st.prefill_chunk:
    cache, logits = _prefill_chunks(graphdef, state, tokens, last, cache_len, st)
  else:
    cache = model.init_cache(b, t)
    if not st.speculative:
      cache = Cache(cache.layers, ())  # only the speculative loop runs the MTP block
    out = model.forward(tokens, positions=positions, cache=cache, absorb=st.absorb_prefill,
                        with_mtp=st.speculative, logits_at=last[:, None], fresh_cache=True)
    widen = lambda a: jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, cache_len - t), (0, 0)])
    cache = jax.tree.map(widen, out.cache)  # every cache array is [..., B, S, width]
    logits = out.logits[:, 0]  # [P, V]
    if st.record_routing:
      routes = _initial_routes(out.router, model.cfg.num_experts_per_tok, cache_len, st.group)
  if st.group > 1:  # one prefill, its cache copied G ways: row p*G + g is sample g of prompt p
    cache = jax.tree.map(lambda a: jnp.repeat(a, st.group, axis=a.ndim - 3), cache)
    logits, lengths, last = (jnp.repeat(a, st.group, axis=0) for a in (logits, lengths, last))
    b = b * st.group
  first, first_lp = sample_with_logprob(logits, jax.random.fold_in(key, 0), st.sampling)
  draft = jnp.zeros_like(first)
  if st.speculative:
    # MTP at the last prompt position needs the first generated token's embedding.
    _, normed, _, mtp_cache = model.mtp[0](out.hidden[rows, last][:, None],
                                           model.embed(first[:, None]), last[:, None], None,
                                           st.absorb_decode, cache.mtp[0])
    draft = jnp.argmax(model.head(normed)[:, 0], axis=-1).astype(jnp.int32)
    cache = Cache(cache.layers, (mtp_cache,) + cache.mtp[1:])
  zeros = jnp.zeros((b,), jnp.int32)
  no = jnp.zeros((b,), jnp.bool_)
  buf = _emit(jnp.zeros((b, new_cap + 1), jnp.int32), zeros, first, ~no)
  rec = None
  if st.record_logits:
    rec = jnp.zeros((b, new_cap, logits.shape[-1]), jnp.float32).at[:, 0].set(logits)
  lps = None
  if st.logprobs:
    lps = jnp.zeros((b, new_cap), jnp.float32).at[:, 0].set(first_lp)
  return DecodeState(cache, first, lengths, draft, buf, zeros + 1, (first == eos_id) | (max_new <= 1),
                     jnp.zeros((), jnp.int32), zeros, zeros, rec, lps, routes)


def _prefill_chunks(graphdef, state, tokens, last, cache_len: int, st: _Static
                    ) -> tuple[Cache, jax.Array]:
  """The prompt tokens [B, T] through the model `st.prefill_chunk` at a time into a cache of
  `cache_len` slots (a scan over chunks; the prompt is padded with id 0 to whole chunks, whose
  positions past the cache are dropped by the cache write and never read). Returns the cache and
  the float32 logits [B, V] at each row's last prompt position `last` [B]."""
  b, t = tokens.shape
  chunk = st.prefill_chunk
  n = -(-t // chunk)
  chunks = jnp.pad(tokens, ((0, 0), (0, n * chunk - t))).reshape(b, n, chunk).transpose(1, 0, 2)
  starts = jnp.arange(n, dtype=jnp.int32) * chunk                          # [n]
  model = _merge(graphdef, state)
  cache = model.init_cache(b, cache_len)
  cache = Cache(cache.layers, ())  # chunked prefill is not speculative: no MTP block

  def step(carry, xs):
    cache, kept = carry                                                    # kept [B, V]
    ids, start = xs                                                        # ids [B, chunk]
    positions = jnp.broadcast_to(start + jnp.arange(chunk, dtype=jnp.int32), (b, chunk))
    i = last - start                                                       # [B]
    here = (i >= 0) & (i < chunk)
    out = _merge(graphdef, state).forward(ids, positions=positions, cache=cache,
                                          absorb=st.absorb_prefill, with_mtp=False,
                                          logits_at=jnp.clip(i, 0, chunk - 1)[:, None])
    picked = out.logits[:, 0]                                              # [B, V]
    return (out.cache, jnp.where(here[:, None], picked, kept)), None

  kept = jnp.zeros((b, model.cfg.vocab_size), jnp.float32)
  (cache, logits), _ = jax.lax.scan(step, (cache, kept), (chunks, starts))
  return cache, logits


@functools.partial(jax.jit, static_argnames=("graphdef", "st"), donate_argnames=("carry",))
def _decode(graphdef, state, carry: DecodeState, steps, max_new, eos_id, key, *,
            st: _Static) -> DecodeState:
  """Runs up to `steps` loop steps (stopping early when every sequence is done)."""
  TRACE_COUNTS["decode"] += 1
  rows = jnp.arange(carry.token.shape[0])
  end = carry.step + steps
  if st.absorb_decode:  # W_uk and W_uv laid out for the absorbed products once, outside the loop
    model = _merge(graphdef, state)
    hoist_absorbed_weights(model)
    graphdef, state = nnx.split(model)

  # The model is rebuilt inside the loop body (see `_merge`).
  def plain(s: DecodeState) -> DecodeState:
    model = _merge(graphdef, state)
    out = model.forward(s.token[:, None], positions=s.pos[:, None], cache=s.cache,
                        absorb=st.absorb_decode, with_mtp=False)
    logits = out.logits[:, 0]  # [B, V]
    nxt, lp = sample_with_logprob(logits, jax.random.fold_in(key, s.step + 1), st.sampling)
    run = ~s.done
    rec, lps, routes = s.logits, s.logprobs, s.routes
    if rec is not None:
      rec = rec.at[rows, jnp.where(run, s.count, rec.shape[1])].set(logits, mode="drop")
    if lps is not None:
      lps = lps.at[rows, jnp.where(run, s.count, lps.shape[1])].set(lp, mode="drop")
    if routes:  # the fed token's experts, at its position
      slot = jnp.where(run, s.pos, routes[0].shape[1])
      routes = tuple(buf.at[rows, slot].set(r.topk_idx[:, 0], mode="drop")
                     for buf, r in zip(routes, out.router))
    count = s.count + run
    done = s.done | (run & ((nxt == eos_id) | (count >= max_new)))
    return s._replace(cache=out.cache, token=jnp.where(run, nxt, s.token), pos=s.pos + run,
                      out=_emit(s.out, s.count, nxt, run), count=count, done=done,
                      step=s.step + 1, logits=rec, logprobs=lps, routes=routes)

  def speculative(s: DecodeState) -> DecodeState:
    model = _merge(graphdef, state)
    pair = jnp.stack([s.token, s.draft], axis=1)  # [B, 2]
    pos2 = s.pos[:, None] + jnp.arange(2, dtype=jnp.int32)  # [B, 2]
    out = model.forward(pair, positions=pos2, cache=s.cache, absorb=st.absorb_decode,
                        with_mtp=False)
    g = jnp.argmax(out.logits, axis=-1).astype(jnp.int32)  # [B, 2] main model's choices
    _, normed, _, mtp_cache = model.mtp[0](out.hidden, model.embed(g), pos2, None,
                                           st.absorb_decode, out.cache.mtp[0])
    guess = jnp.argmax(model.head(normed), axis=-1).astype(jnp.int32)  # [B, 2]
    run = ~s.done
    accept = g[:, 0] == s.draft
    out_buf = _emit(s.out, s.count, g[:, 0], run)
    count = s.count + run
    stop = run & ((g[:, 0] == eos_id) | (count >= max_new))
    second = run & ~stop & accept
    out_buf = _emit(out_buf, count, g[:, 1], second)
    count = count + second
    stop = stop | (second & ((g[:, 1] == eos_id) | (count >= max_new)))
    cache = Cache(out.cache.layers, (mtp_cache,) + out.cache.mtp[1:])
    return s._replace(cache=cache, token=jnp.where(run, jnp.where(second, g[:, 1], g[:, 0]), s.token),
                      pos=s.pos + run + second,
                      draft=jnp.where(run, jnp.where(accept, guess[:, 1], guess[:, 0]), s.draft),
                      out=out_buf, count=count, done=s.done | stop, step=s.step + 1,
                      verify=s.verify + run, accepted=s.accepted + (run & accept))

  body = speculative if st.speculative else plain
  cond = lambda s: (s.step < end) & ~jnp.all(s.done)
  return jax.lax.while_loop(cond, body, carry)


# ---------------------------------------------------------------------------------------- driver
class Generation:
  """One batch of prompts being generated: `prefill()`, then `decode(steps)` until `finished`.

  `generate` runs it in one go; the CLI calls `decode` in chunks to stream text; the RL sampler
  (`num_samples`, `return_logprobs`, `record_routing`: see the module docstring) reads
  `arrays()`.
  """

  def __init__(self, model, prompt_ids, max_new_tokens: int, *, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None, seed: int = 0,
               eos_id: int | None = None, max_len: int | None = None, absorb: bool | None = None,
               speculative: bool = False, moe_method: str | None = None,
               record_logits: bool = False, prefill_chunk: int | None = None,
               num_samples: int = 1, return_logprobs: bool = False,
               record_routing: bool = False):
    cfg = model.cfg
    if prefill_chunk is not None and (not isinstance(prefill_chunk, (int, np.integer))
                                      or prefill_chunk < 1):
      raise ValueError(f"prefill_chunk must be an integer >= 1 or None, got {prefill_chunk!r}")
    if prefill_chunk is not None and speculative:
      raise ValueError("prefill_chunk is not available with speculative decoding (the MTP "
                       "block's cache is filled by the one-shot prefill)")
    if prefill_chunk is not None and record_routing:
      raise ValueError("prefill_chunk is not available with record_routing (the prompt's "
                       "experts are recorded by the one-shot prefill)")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
      raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    sampling = SamplingParams(float(temperature), top_k, top_p)
    if speculative and (num_samples > 1 or return_logprobs or record_routing):
      raise ValueError("speculative decoding is greedy and plain: num_samples > 1, "
                       "return_logprobs and record_routing need speculative=False")
    if speculative:
      if not cfg.num_nextn_predict_layers or not len(model.mtp):
        raise ValueError("speculative=True needs a model with an MTP module "
                         "(num_nextn_predict_layers >= 1, MTP weights loaded)")
      if not sampling.greedy:
        raise ValueError("speculative decoding is greedy only: use temperature=0")
      if record_logits:
        raise ValueError("record_logits is not available with speculative decoding")
    self.tokens, self.lengths = prepare_prompts(prompt_ids, cfg.vocab_size)
    longest = int(self.lengths.max())
    limit = max_len if max_len is not None else cfg.max_position_embeddings
    if longest + max_new_tokens > limit:
      what = "max_len" if max_len is not None else "the model's max_position_embeddings"
      raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds "
                       f"{what} = {limit}")
    self.new_cap = bucket(max_new_tokens)
    self.cache_len = (int(max_len) if max_len is not None
                      else self.tokens.shape[1] + self.new_cap)
    if self.cache_len < self.tokens.shape[1]:  # the padded prompt bucket must fit in the cache
      self.tokens = self.tokens[:, :self.cache_len]
    absorb_prefill = (self.tokens.shape[1] < ABSORB_PREFILL_BELOW) if absorb is None else absorb
    self.static = _Static(sampling, bool(absorb_prefill), True if absorb is None else bool(absorb),
                          bool(speculative), bool(record_logits),
                          None if prefill_chunk is None else int(prefill_chunk),
                          bool(return_logprobs), int(num_samples), bool(record_routing))
    self.max_new = int(max_new_tokens)
    eos = cfg.eos_token_id if eos_id is None else eos_id
    self.eos_id = -1 if eos is None or eos < 0 else int(eos)
    self.key = jax.random.key(seed)
    if moe_method:  # the same weights under another config, never a mutated module
      model = replace_config(model, moe_dispatch=moe_method)
    self.graphdef, self.state = nnx.split(model)
    self.carry: DecodeState | None = None

  def _scalars(self):
    return jnp.int32(self.max_new), jnp.int32(self.eos_id), self.key

  def prefill(self) -> None:
    """Runs the prompt through the model and emits the first token (blocks until done)."""
    self.carry = _prefill(self.graphdef, self.state, jnp.asarray(self.tokens),
                          jnp.asarray(self.lengths), *self._scalars(), cache_len=self.cache_len,
                          new_cap=self.new_cap, st=self.static)
    jax.block_until_ready(self.carry.count)

  def decode(self, steps: int | None = None) -> None:
    """Up to `steps` more decode steps (all remaining when None); blocks until done."""
    if self.carry is None:
      self.prefill()
    steps = self.max_new if steps is None else steps
    if not isinstance(steps, (int, np.integer)) or steps < 1:  # 0 steps: a caller looping
      raise ValueError(f"decode: steps must be an integer >= 1, got {steps!r}")  # forever
    self.carry = _decode(self.graphdef, self.state, self.carry, jnp.int32(steps),
                         *self._scalars(), st=self.static)
    jax.block_until_ready(self.carry.count)

  @property
  def finished(self) -> bool:
    return self.carry is not None and bool(np.all(np.asarray(self.carry.done)))

  def results(self) -> list[list[int]]:
    """The new tokens of each sequence so far, ending at its EOS (included) or max_new_tokens."""
    out, count = np.asarray(self.carry.out), np.asarray(self.carry.count)
    return [out[b, :min(int(count[b]), self.max_new)].tolist() for b in range(out.shape[0])]

  def logprobs(self) -> list[list[float]]:
    """Per sequence, the log-probability of each token `results()` holds (return_logprobs)."""
    if self.carry is None or self.carry.logprobs is None:
      raise ValueError("logprobs needs return_logprobs=True and a prefill")
    lps, count = np.asarray(self.carry.logprobs), np.asarray(self.carry.count)
    return [lps[b, :min(int(count[b]), self.max_new)].tolist() for b in range(lps.shape[0])]

  def arrays(self) -> dict[str, Any]:
    """The batch as padded arrays for a learner: "tokens" [B, N] int32 (0 past each count),
    "counts" [B] int32, "eos" [B] bool (stopped at EOS rather than at the length limit),
    "prompt_tokens" [P, T] and "prompt_lengths" [P] (the right-padded prompts), "logprobs"
    [B, N] float32 (return_logprobs), "routes" (record_routing: per MoE layer [B, S, K] int32).
    N is the bucketed capacity (>= max_new_tokens); S the cache length."""
    c = self.carry
    count = np.minimum(np.asarray(c.count), self.max_new)
    n = self.new_cap
    live = np.arange(n)[None, :] < count[:, None]
    tokens = np.where(live, np.asarray(c.out)[:, :n], 0).astype(np.int32)
    last = tokens[np.arange(len(count)), np.maximum(count - 1, 0)]
    out = {"tokens": tokens, "counts": count.astype(np.int32),
           "eos": (last == self.eos_id) & (count > 0),
           "prompt_tokens": self.tokens, "prompt_lengths": self.lengths}
    if c.logprobs is not None:
      out["logprobs"] = np.where(live, np.asarray(c.logprobs), 0.0).astype(np.float32)
    if c.routes is not None:
      out["routes"] = tuple(np.asarray(r) for r in c.routes)
    return out

  def step_logits(self) -> list[np.ndarray]:
    """Per sequence: float32 [n, V], the logits from which each emitted token was chosen."""
    if self.carry is None or self.carry.logits is None:
      raise ValueError("step_logits needs record_logits=True and a prefill")
    rec, count = np.asarray(self.carry.logits), np.asarray(self.carry.count)
    return [rec[b, :min(int(count[b]), self.max_new)] for b in range(rec.shape[0])]

  def acceptance(self) -> float:
    """Speculative decoding: accepted drafts / verification steps over the batch."""
    verify = int(np.asarray(self.carry.verify).sum())
    return int(np.asarray(self.carry.accepted).sum()) / verify if verify else 0.0


def generate(model, prompt_ids: Any, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             eos_id: int | None = None, max_len: int | None = None, absorb: bool | None = None,
             speculative: bool = False, moe_method: str | None = None,
             prefill_chunk: int | None = None, num_samples: int = 1,
             return_logprobs: bool = False):
  """Generates up to `max_new_tokens` tokens after each prompt; returns the new token ids.

  Args:
    model: a `DeepseekForCausalLM`.
    prompt_ids: a list of lists of token ids (any lengths), one list, or an int array [B, T].
    max_new_tokens: >= 1.
    temperature, top_k, top_p: sampling (see `deepseek_jax.sampling`); temperature 0 is greedy.
    seed: the sampling noise's seed (same seed, same output).
    eos_id: stop a sequence after it emits this id; None uses the config's `eos_token_id`;
      a negative value never stops early.
    max_len: the cache length (prompt + new tokens must fit); default: the bucketed total, and
      the prompt must fit in the model's `max_position_embeddings`.
    absorb: None decodes with the absorbed MLA path and prefills by prompt length
      (`ABSORB_PREFILL_BELOW`); True or False forces one path for both.
    speculative: greedy self-speculative decoding with MTP depth 1 (same output, fewer steps).
    moe_method: override the model's MoE dispatch method for generation (e.g. "dense").
    prefill_chunk: prefill the prompt this many tokens at a time (bounded activations for long
      prompts; not with `speculative`); None: in one go.
    num_samples: G samples of every prompt (rows p*G .. p*G + G-1 belong to prompt p), all from
      one prefill of the prompt (its latent cache copied G ways).
    return_logprobs: also return each token's log-probability under the distribution it was
      sampled from: log softmax of logits / temperature after the top-k and top-p filters
      (`sampling.token_logprobs`); 0 when greedy (a point mass).

  Returns:
    One list per prompt (per sample) of the generated ids (not the prompt), ending with EOS when
    one was emitted, else `max_new_tokens` long; with `return_logprobs`, the pair (those lists,
    lists of the matching float log-probabilities).
  """
  g = Generation(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                 top_p=top_p, seed=seed, eos_id=eos_id, max_len=max_len, absorb=absorb,
                 speculative=speculative, moe_method=moe_method,
                 prefill_chunk=prefill_chunk, num_samples=num_samples,
                 return_logprobs=return_logprobs)
  g.prefill()
  g.decode()
  if return_logprobs:
    return g.results(), g.logprobs()
  return g.results()


def cache_bytes(cache: Cache) -> int:
  """Bytes held by a cache's arrays."""
  return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
