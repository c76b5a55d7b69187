"""The absorbed decode step over the latent cache: same result as a forward over the whole
sequence, and, in the compiled decode loop, the cache updated in place (no copy, no transpose of
a layer's cache: issue 17's batch-1 long-context decode was bound by such copies).

The HLO check reads only op names (`copy`, `transpose`, `dynamic-update-slice`, `scatter`,
`fusion` and what a fusion calls), so it holds across XLA versions that name their fusions
differently.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax import generation, get_preset
from deepseek_jax.attention import write_cache
from deepseek_jax.layers import rope_cos_sin
from deepseek_jax.model import DeepseekForCausalLM
from hlo_ops import while_bodies, whole_cache_ops

CFG = get_preset("tiny_v3")
CACHE_LEN = 1000  # S: large enough that a layer's cache has a size nothing else has


@pytest.fixture(scope="module")
def model():
  return DeepseekForCausalLM(CFG, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("scan_layers", [False, True], ids=["layers", "scan_layers"])
def test_decode_step_equals_full_forward(model, scan_layers):
  """Rows at different positions, slots past each row's position holding garbage: the step's
  logits equal the expanded forward over the row's whole sequence, and the cache gains exactly
  the token's latents at its position."""
  if scan_layers:
    model = DeepseekForCausalLM(CFG.replace(scan_layers=True), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  seqs = rng.integers(0, CFG.vocab_size, size=(2, 12)).astype(np.int32)
  lengths = np.array([11, 6])                    # row b's new token sits at position lengths[b]
  s = 16
  # the whole rows prefilled, then every slot at or past a row's position overwritten by noise
  full = nnx.jit(lambda m, ids, c: m.forward(ids, cache=c, absorb=False, with_mtp=False))(
      model, jnp.asarray(seqs), model.init_cache(2, s))
  past = jnp.arange(s)[None, :, None] >= jnp.asarray(lengths)[:, None, None]  # [B, S, 1]
  noise = lambda a: jnp.where(past, jnp.asarray(rng.normal(size=a.shape) * 1e3, a.dtype), a)
  garbage = jax.tree.map(noise, full.cache.layers)  # slots at and past each row's position
  tok = jnp.asarray(seqs[np.arange(2), lengths])[:, None]                     # [B, 1]
  pos = jnp.asarray(lengths, jnp.int32)[:, None]                              # [B, 1]
  step = nnx.jit(lambda m, c: m.forward(tok, positions=pos, cache=c, absorb=True,
                                        with_mtp=False))
  out = step(model, full.cache._replace(layers=garbage))
  for b, n in enumerate(lengths):  # causal: position n of the full forward saw tokens 0..n
    np.testing.assert_allclose(np.asarray(out.logits[b, 0]), np.asarray(full.logits[b, n]),
                               rtol=2e-5, atol=2e-5)
  # the new cache is the old one with the token's latents written at its position
  for old, new in zip(jax.tree.leaves(garbage), jax.tree.leaves(out.cache.layers)):
    old, new = np.asarray(old), np.asarray(new)
    for b, n in enumerate(lengths):
      keep = np.ones(s, bool)
      keep[n] = False
      np.testing.assert_array_equal(new[..., b, keep, :], old[..., b, keep, :])
      assert np.all(np.abs(new[..., b, n, :]) < 1e2)  # the token's latent, not the noise
  if not scan_layers:  # the first layer's write holds the token's own latents
    x = model.layers[0].input_layernorm(model.embed(tok))
    c_kv, k_pe = model.layers[0].self_attn.latents(x, *rope_cos_sin(CFG, pos))
    want = write_cache(garbage[0], c_kv, k_pe, pos)
    for a, w in zip(out.cache.layers[0], want):
      np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=1e-6, atol=1e-6)


def _decode_loop_hlo(model, batch: int) -> str:
  """The compiled decode loop (`generation._decode`) of `model` for `batch` rows."""
  g = generation.Generation(model, np.ones((batch, 1), np.int32), 4, eos_id=-1,
                            max_len=CACHE_LEN)
  carry = jax.eval_shape(lambda state: generation._prefill(  # the carry's shapes: no prefill run
      g.graphdef, state, jnp.asarray(g.tokens), jnp.asarray(g.lengths), *g._scalars(),
      cache_len=g.cache_len, new_cap=g.new_cap, st=g.static), g.state)
  return generation._decode.lower(g.graphdef, g.state, carry, jnp.int32(3), *g._scalars(),
                                  st=g.static).compile().as_text()


# scanned: a dense stack of 2 layers and a MoE stack of 3, so that a layer's cache array, a
# stack's and every other array differ in size
SCANNED = CFG.replace(scan_layers=True, num_hidden_layers=5, first_k_dense_replace=2)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["layers", "scan_layers"])
@pytest.mark.parametrize("batch", [1, 2])
def test_decode_loop_updates_the_cache_in_place(model, batch, scan_layers):
  """The compiled decode loop (`generation._decode`, its carry donated) touches each layer's
  latent cache only by one in-place update per cache array and step: no copy of it, no
  transpose for the score or value product, no second update on a copy. Scanned, each stack's
  cache [L, B, S, C|R] rides in the layer scan's carry and is updated in place (no fresh stacked
  buffer and copy per step); the layer scan's body reads its layer's view with one dynamic-slice
  per array (XLA:CPU's matmuls take no sliced operand, so the view is a copy)."""
  if scan_layers:
    model = DeepseekForCausalLM(SCANNED, rngs=nnx.Rngs(0))
  hlo = _decode_loop_hlo(model, batch)
  layer = {batch * CACHE_LEN * CFG.kv_lora_rank, batch * CACHE_LEN * CFG.qk_rope_head_dim}
  if not scan_layers:
    arrays = 2 * CFG.num_hidden_layers  # c_kv and k_pe per layer
    assert whole_cache_ops(hlo, layer) == {"in-place update": arrays}
    return
  stacks = [s.input_layernorm.scale.shape[0] for s in model.stacks()]  # L per stack
  assert stacks == [2, 3]
  stacked = {n * a for n in stacks for a in layer}
  assert whole_cache_ops(hlo, stacked) == {"in-place update": 2 * len(stacks)}
  assert whole_cache_ops(hlo, layer) == {"dynamic-slice": 2 * len(stacks)}


@pytest.mark.parametrize("scan_layers", [False, True], ids=["layers", "scan_layers"])
def test_decode_loop_reads_absorbed_weights_laid_out_before_it(model, scan_layers):
  """W_uk and W_uv are laid out for the absorbed products once, before the decode loop
  (`attention.hoist_absorbed_weights`; each step transposed both out of kv_b_proj's kernel
  again: 1.9 ms of a 23 ms batch-8 step). Inside the loop no op makes an array of their size;
  scanned, only the layer scan's views of the stacked copies (a dynamic-slice each, as for every
  stacked weight), none of them transposing."""
  cfg = SCANNED if scan_layers else CFG
  if scan_layers:
    model = DeepseekForCausalLM(SCANNED, rngs=nnx.Rngs(0))
  hlo = _decode_loop_hlo(model, 2)
  heads_by_latent = cfg.num_attention_heads * cfg.kv_lora_rank
  sizes = {heads_by_latent * cfg.qk_nope_head_dim, heads_by_latent * cfg.v_head_dim}
  in_loop = whole_cache_ops(hlo, sizes, within=while_bodies(hlo))
  if scan_layers:
    assert set(in_loop) == {"dynamic-slice"}
  else:
    assert in_loop == {}
    assert whole_cache_ops(hlo, sizes)  # made before the loop
