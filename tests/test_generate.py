"""Generation: transformers parity, per-step logits, cache size, compilation reuse, streaming, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_jax import generation, get_preset
from deepseek_jax.generation import Generation, generate
from deepseek_jax.model import DeepseekForCausalLM
from deepseek_jax.pretrained import from_pretrained
from hf_reference import save_hf

FAMILIES = ["tiny_v3", "tiny_v2", "tiny_v2_lite"]
PROMPTS = [[5, 17, 300, 42, 9, 250, 3], [77, 12], [400, 401, 2, 88, 90, 91, 92, 93, 94, 95, 96]]
NEW = 10


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  out = {}
  for name in FAMILIES:
    d = tmp_path_factory.mktemp(name)
    out[name] = (d, save_hf(get_preset(name), d, seed=1))
  return out


def _hf_greedy(model, prompt, n, eos):
  import torch
  ids = torch.tensor([prompt])
  with torch.no_grad():
    seq = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=n, eos_token_id=eos, pad_token_id=eos)
  return seq[0, len(prompt):].tolist()


@pytest.mark.torch
@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_matches_transformers_generate(checkpoints, name):
  d, hf = checkpoints[name]
  model = from_pretrained(d, dtype=jnp.float32)
  ref = [_hf_greedy(hf, p, NEW, eos=-1) for p in PROMPTS]
  assert generate(model, PROMPTS, NEW, eos_id=-1) == ref
  # another dispatch for generation replaces the config of a copy; the model is left as it is
  assert generate(model, PROMPTS, NEW, eos_id=-1, moe_method="dense") == ref
  assert model.cfg.moe_dispatch == "auto"
  # With an EOS that one sequence emits mid-way: that one stops (EOS included), the rest go on.
  eos = ref[0][4]
  ours = generate(model, PROMPTS, NEW, eos_id=eos)
  for p, o, r in zip(PROMPTS, ours, ref):
    stop = r.index(eos) + 1 if eos in r else NEW
    assert o == r[:stop] == _hf_greedy(hf, p, NEW, eos=eos)[:stop]
  assert len(ours[0]) <= 5


@pytest.mark.parametrize("scan, absorb", [(False, None), (True, False)],
                         ids=["unrolled-auto", "scanned-expanded"])
def test_step_logits_equal_full_forward(checkpoints, scan, absorb):
  model = from_pretrained(checkpoints["tiny_v3"][0], dtype=jnp.float32, scan_layers=scan)
  g = Generation(model, PROMPTS, NEW, eos_id=-1, record_logits=True, absorb=absorb)
  g.prefill()
  g.decode()
  forward = nnx.jit(lambda m, ids: m(ids))
  for p, toks, logits in zip(PROMPTS, g.results(), g.step_logits()):
    ids = np.zeros((1, 32), np.int32)  # one compiled forward for every prompt
    ids[0, :len(p) + NEW - 1] = p + toks[:-1]
    full = np.asarray(forward(model, jnp.asarray(ids)))[0, len(p) - 1:len(p) - 1 + NEW]
    assert logits.shape == full.shape == (NEW, model.cfg.vocab_size)
    np.testing.assert_allclose(logits, full, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.argmax(logits, -1), toks)
  _check_cache_bytes(g, model.cfg, 16 + 16)  # scanned: stacked per layer group


def _check_cache_bytes(g: Generation, cfg, max_len: int):
  cache = g.carry.cache
  per_elem = jax.tree.leaves(cache)[0].dtype.itemsize
  expected = len(PROMPTS) * max_len * cfg.num_hidden_layers * (
      cfg.kv_lora_rank + cfg.qk_rope_head_dim) * per_elem
  assert generation.cache_bytes(cache) == expected
  assert cache.mtp == ()  # plain decoding never runs the MTP block
  assert expected == len(PROMPTS) * max_len * cfg.kv_cache_bytes_per_token(per_elem)


def test_cache_holds_only_latents():
  cfg = get_preset("tiny_v3")
  model = DeepseekForCausalLM(cfg, rngs=nnx.Rngs(0))
  g = Generation(model, PROMPTS, 20, max_len=48)
  g.prefill()
  _check_cache_bytes(g, cfg, 48)


def test_no_recompilation_within_buckets():
  model = DeepseekForCausalLM(get_preset("tiny_v2_lite"), rngs=nnx.Rngs(1))
  generate(model, [[1, 2, 3]], 3, eos_id=-1)
  before = dict(generation.TRACE_COUNTS)
  # other prompt lengths (same bucket of 16), other max_new_tokens (same bucket), other EOS
  out = generate(model, [list(range(2, 15))], 9, eos_id=7)
  generate(model, [[4] * 16], 16, eos_id=-1)
  assert dict(generation.TRACE_COUNTS) == before
  assert 1 <= len(out[0]) <= 9


def test_chunked_decode_equals_one_call_and_seed_reproduces():
  model = DeepseekForCausalLM(get_preset("tiny_v3"), rngs=nnx.Rngs(2))
  kw = dict(temperature=1.0, top_k=20, top_p=0.9, eos_id=-1)
  whole = generate(model, PROMPTS, 12, seed=3, **kw)
  g = Generation(model, PROMPTS, 12, seed=3, **kw)
  g.prefill()
  sizes = []
  while not g.finished:
    g.decode(4)
    sizes.append(min(len(r) for r in g.results()))
  assert g.results() == whole and sizes == [5, 9, 12]
  with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
    g.decode(0)  # a streaming loop decoding 0 steps at a time never finished (--chunk=0)
  assert generate(model, PROMPTS, 12, seed=3, **kw) == whole
  assert generate(model, PROMPTS, 12, seed=4, **kw) != whole


def test_array_prompts_and_single_prompt():
  model = DeepseekForCausalLM(get_preset("tiny_v2_lite"), rngs=nnx.Rngs(1))
  arr = np.array([[3, 4, 5], [6, 7, 8]], np.int32)
  lists = generate(model, arr.tolist(), 4, eos_id=-1)
  assert generate(model, jnp.asarray(arr), 4, eos_id=-1) == lists
  assert generate(model, [3, 4, 5], 4, eos_id=-1) == lists[:1]


@pytest.mark.parametrize("prompts, kw, match", [
    ([[1] * 30], dict(max_len=32), "exceeds max_len"),
    ([[1] * 250], {}, "max_position_embeddings"),
    ([[1, 2], []], {}, r"prompt_ids\[1\] is empty"),
    ([], {}, "batch is empty"),
    ([[1, 512]], {}, "token id 512 is outside the vocabulary"),
    ([[1, -1]], {}, "token id -1 is outside"),
    ([[1, 2]], dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    ([[1, 2]], dict(temperature=-1.0), "temperature"),
    ([[1, 2]], dict(top_p=0.0), "top_p"),
])
def test_bad_inputs(prompts, kw, match):
  model = DeepseekForCausalLM(get_preset("tiny_v2_lite"), rngs=nnx.Rngs(1))
  kw = dict(dict(max_new_tokens=8), **kw)
  with pytest.raises(ValueError, match=match):
    generate(model, prompts, kw.pop("max_new_tokens"), **kw)


def test_speculative_needs_mtp():
  model = DeepseekForCausalLM(get_preset("tiny_v2"), rngs=nnx.Rngs(1))  # no MTP layers
  with pytest.raises(ValueError, match="MTP"):
    generate(model, [[1, 2]], 4, speculative=True)


def test_model_dir_without_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a model directory"):
    from_pretrained(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="not a directory"):
    from_pretrained(str(tmp_path / "missing"))


def test_bucket():
  assert [generation.bucket(n) for n in (1, 16, 17, 100, 512, 513, 1100)] == [
      16, 16, 32, 128, 512, 1024, 1536]
  assert jax.tree.leaves(generation.prepare_prompts([[3], [4, 5]], 10))[1].tolist() == [1, 2]
