"""MLA decode attention kernels (interpret mode) against their pure-jnp reference, ragged lengths;
each test runs both backends, the Mosaic-TPU kernel and the Triton (GPU) kernel."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.kernels_pallas import DecodeBlockSizes, mla_decode_attention, mla_decode_reference

B, H, L, R = 5, 4, 64, 16
SCALE = 0.15
TOL = {jnp.float32: dict(rtol=1e-5, atol=2e-5), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}
# S = 100 leaves a partial last block; lengths cover 0, 1, mid-block, block edges, full and past S.
LENGTHS = [0, 1, 37, 64, 100]
BACKENDS = pytest.mark.parametrize("backend", ["mosaic_tpu", "triton"])
CASES = {
    "ragged_tail": (100, DecodeBlockSizes(block_s=32, num_splits=2)),
    "uneven_splits": (128, DecodeBlockSizes(block_s=16, num_splits=3)),
    "one_block": (100, DecodeBlockSizes(block_s=512, num_splits=4)),
}


def _inputs(s_len, dtype, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((B, H, L + R)), dtype)
  cache = jnp.asarray(rng.standard_normal((B, s_len, L + R)), dtype)
  return q, cache


@functools.cache
def _kernel(bs, backend="mosaic_tpu", latent=L):
  return jax.jit(functools.partial(mla_decode_attention, kv_lora_rank=latent, softmax_scale=SCALE,
                                   block_sizes=bs, interpret=True, backend=backend))


@BACKENDS
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_decode_matches_reference(case, dtype, backend):
  s_len, bs = CASES[case]
  q, cache = _inputs(s_len, dtype)
  lengths = jnp.array([min(n, s_len) for n in LENGTHS], jnp.int32)
  got = _kernel(bs, backend)(q, cache, lengths)
  assert got.shape == (B, H, L) and got.dtype == dtype
  # Reference in float32 from the same (rounded) inputs.
  want = mla_decode_reference(q.astype(jnp.float32), cache.astype(jnp.float32), lengths,
                              kv_lora_rank=L, softmax_scale=SCALE)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), **TOL[dtype])
  assert not np.any(np.asarray(got[0], np.float32)), "a row of length 0 must return zeros"


@BACKENDS
def test_decode_ignores_positions_past_length(backend):
  """Garbage (even NaN) past a row's length must not reach the output."""
  s_len, bs = CASES["ragged_tail"]
  q, cache = _inputs(s_len, jnp.float32, seed=1)
  lengths = jnp.array([3, 40, 64, 99, 0], jnp.int32)
  pos = np.arange(s_len)[None, :, None]
  poisoned = jnp.where(pos >= np.asarray(lengths)[:, None, None], jnp.nan, cache)
  got = _kernel(bs, backend)(q, poisoned, lengths)
  want = _kernel(bs, backend)(q, cache, lengths)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  ref = mla_decode_reference(q, poisoned, lengths, kv_lora_rank=L, softmax_scale=SCALE)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), **TOL[jnp.float32])


@BACKENDS
def test_decode_single_position_returns_its_value(backend):
  """With length 1 the softmax is one-hot: the output is that position's latent row."""
  q, cache = _inputs(32, jnp.float32, seed=2)
  lengths = jnp.ones((B,), jnp.int32)
  got = _kernel(DecodeBlockSizes(block_s=8, num_splits=2), backend)(q, cache, lengths)
  np.testing.assert_allclose(np.asarray(got), np.broadcast_to(np.asarray(cache[:, None, 0, :L]), got.shape),
                             rtol=1e-6, atol=1e-6)


@BACKENDS
def test_decode_gradient_matches_reference(backend):
  s_len, bs = CASES["ragged_tail"]
  q, cache = _inputs(s_len, jnp.float32, seed=3)
  lengths = jnp.array(LENGTHS, jnp.int32)
  kernel = lambda q, c: jnp.sum(_kernel(bs, backend)(q, c, lengths) ** 2)
  ref = lambda q, c: jnp.sum(mla_decode_reference(q, c, lengths, kv_lora_rank=L, softmax_scale=SCALE) ** 2)
  for g, w in zip(jax.grad(kernel, (0, 1))(q, cache), jax.grad(ref, (0, 1))(q, cache)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


def test_decode_bad_inputs_raise():
  q, cache = _inputs(16, jnp.float32)
  with pytest.raises(ValueError, match="lengths"):
    mla_decode_attention(q, cache, jnp.zeros((B + 1,), jnp.int32), kv_lora_rank=L, softmax_scale=1.0,
                         interpret=True)
  with pytest.raises(ValueError, match="kv_lora_rank"):
    mla_decode_attention(q, cache, jnp.zeros((B,), jnp.int32), kv_lora_rank=L + R + 1, softmax_scale=1.0,
                         interpret=True)
  with pytest.raises(ValueError, match="block_s"):
    DecodeBlockSizes(block_s=12)


def test_decode_triton_pads_widths_and_heads_that_are_not_powers_of_two():
  """Triton blocks are powers of two of at least 16: 3 heads, a latent of 24 and a rope width of
  8 (the tiny models' kind of widths) are padded inside the op, never visible outside it."""
  h, latent, rope, s_len = 3, 24, 8, 40
  rng = np.random.default_rng(6)
  q = jnp.asarray(rng.standard_normal((B, h, latent + rope)), jnp.float32)
  cache = jnp.asarray(rng.standard_normal((B, s_len, latent + rope)), jnp.float32)
  lengths = jnp.array([0, 1, 17, 33, 40], jnp.int32)
  got = _kernel(DecodeBlockSizes(block_s=16, num_splits=2), "triton", latent)(q, cache, lengths)
  want = mla_decode_reference(q, cache, lengths, kv_lora_rank=latent, softmax_scale=SCALE)
  assert got.shape == (B, h, latent)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL[jnp.float32])


def test_decode_tpu_semantics_interpreter():
  """The Mosaic-TPU kernel under the TPU-semantics interpreter (uninitialised memory is NaN,
  races checked), ragged lengths with an empty row."""
  from jax.experimental.pallas import tpu as pltpu
  s_len, bs = CASES["ragged_tail"]
  q, cache = _inputs(s_len, jnp.float32, seed=5)
  lengths = jnp.array(LENGTHS, jnp.int32)
  got = mla_decode_attention(q, cache, lengths, kv_lora_rank=L, softmax_scale=SCALE, block_sizes=bs,
                             interpret=pltpu.InterpretParams(uninitialized_memory="nan",
                                                             detect_races=True),
                             backend="mosaic_tpu")
  want = mla_decode_reference(q, cache, lengths, kv_lora_rank=L, softmax_scale=SCALE)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL[jnp.float32])


def test_model_decode_steps_through_the_kernel_equal_xla():
  """The model's absorbed decode step with cfg.mla_decode="pallas" (interpreted here) gives the
  XLA path's logits and greedy tokens, for prompts of different lengths."""
  from flax import nnx

  from deepseek_jax import generate, get_preset
  from deepseek_jax.model import DeepseekForCausalLM
  cfg = get_preset("tiny_v3", num_nextn_predict_layers=0)
  models = {m: DeepseekForCausalLM(cfg.replace(mla_decode=m), rngs=nnx.Rngs(0))
            for m in ("xla", "pallas")}

  def decode_step(model, cache, tok, pos):
    out = model.forward(tok, positions=pos, cache=cache, absorb=True, with_mtp=False)
    return out.logits

  tok = jnp.asarray([[3], [9]], jnp.int32)
  pos = jnp.asarray([[4], [11]], jnp.int32)  # ragged: the sequences have different lengths
  rng = np.random.default_rng(0)
  cache = models["xla"].init_cache(2, 24)
  cache = jax.tree.map(lambda c: jnp.asarray(rng.standard_normal(c.shape), c.dtype)
                       if jnp.issubdtype(c.dtype, jnp.floating) else c, cache)
  jaxprs = {m: str(jax.make_jaxpr(functools.partial(decode_step, models[m]))(cache, tok, pos))
            for m in models}
  assert "pallas_call" in jaxprs["pallas"] and "pallas_call" not in jaxprs["xla"]
  logits = {m: decode_step(models[m], cache, tok, pos) for m in models}
  np.testing.assert_allclose(logits["pallas"], logits["xla"], rtol=1e-5, atol=1e-5)
  prompts = [[5, 9, 2], [7, 1, 3, 8, 4, 6, 2]]
  assert (generate(models["pallas"], prompts, 6, eos_id=-1, absorb=True)
          == generate(models["xla"], prompts, 6, eos_id=-1, absorb=True))


def test_auto_decode_uses_the_kernel_on_tpus_and_gpus():
  """cfg.mla_decode="auto": the Pallas kernel on TPUs and GPUs (CUDA and ROCm), XLA on the CPU."""
  from deepseek_jax import get_preset
  from deepseek_jax.attention import use_decode_kernel
  cfg = get_preset("tiny_v3")
  assert cfg.mla_decode == "auto"
  assert [use_decode_kernel(cfg, p) for p in ("tpu", "gpu", "cuda", "rocm", "cpu")] == [
      True, True, True, True, False]
  assert not use_decode_kernel(cfg.replace(mla_decode="xla"), "gpu")
  assert use_decode_kernel(cfg.replace(mla_decode="pallas"), "cpu")
