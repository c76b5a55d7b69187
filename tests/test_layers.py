"""Per-layer parity with transformers: attention alone, router choice, the MoE block alone."""

import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import get_preset
from deepseek_jax.pretrained import from_pretrained
from hf_reference import save_hf

pytestmark = pytest.mark.torch  # the transformers oracle (needs torch)

FAMILIES = ["tiny_v3", "tiny_v2", "tiny_v2_lite"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
  out = {}
  for name in FAMILIES:
    cfg = get_preset(name)
    d = tmp_path_factory.mktemp(name)
    hf = save_hf(cfg, d, seed=3)
    out[name] = (cfg, hf, from_pretrained(d, dtype=jnp.float32, moe_dispatch="dense"))
  return out


def _hidden(cfg, b=2, t=11, seed=0):
  return np.random.RandomState(seed).randn(b, t, cfg.hidden_size).astype(np.float32)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("absorb", [False, True], ids=["expanded", "absorbed"])
@pytest.mark.parametrize("t", [11, 300], ids=["one-block", "four-blocks"])
def test_attention_alone(pairs, name, absorb, t):
  import torch
  cfg, hf, ours = pairs[name]
  x = _hidden(cfg, t=t)
  b, t = x.shape[:2]
  pos = torch.arange(t)[None].expand(b, t)
  xt = torch.from_numpy(x)
  mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
  with torch.no_grad():
    pe = hf.model.rotary_emb(xt, pos)
    ref, _ = hf.model.layers[0].self_attn(xt, position_embeddings=pe, attention_mask=mask)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  got, _ = ours.layers[0].self_attn(jnp.asarray(x), positions, absorb=absorb)
  np.testing.assert_allclose(np.asarray(got), ref.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_router_chooses_the_reference_experts(pairs, name):
  import torch
  cfg, hf, ours = pairs[name]
  x = _hidden(cfg).reshape(-1, cfg.hidden_size)
  with torch.no_grad():
    _, ref_w, ref_idx = hf.model.layers[1].mlp.gate(torch.from_numpy(x))
  r = ours.layers[1].mlp.gate(jnp.asarray(x))
  order = np.argsort(ref_idx.numpy(), -1)
  got_order = np.argsort(np.asarray(r.topk_idx), -1)
  np.testing.assert_array_equal(np.sort(np.asarray(r.topk_idx), -1), np.sort(ref_idx.numpy(), -1))
  np.testing.assert_allclose(np.take_along_axis(np.asarray(r.topk_weight), got_order, -1),
                             np.take_along_axis(ref_w.numpy(), order, -1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("dispatch", ["dense", "ragged", "blocked"])
def test_moe_block_alone(pairs, name, dispatch):
  import torch
  cfg, hf, ours = pairs[name]
  x = _hidden(cfg)
  with torch.no_grad():
    ref = hf.model.layers[1].mlp(torch.from_numpy(x)).numpy()
  moe = ours.layers[1].mlp
  moe.method = dispatch
  got, _ = moe(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5, rtol=1e-5)
