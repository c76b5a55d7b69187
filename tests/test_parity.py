"""Whole-model parity with transformers (the oracle), float32, through save_pretrained/from_pretrained."""

import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import get_preset
from deepseek_jax.pretrained import from_pretrained
from hf_reference import hf_logits, save_hf

pytestmark = pytest.mark.torch  # the transformers oracle (needs torch)

# tiny_v3: q low-rank, sigmoid, noaux_tc with a random nonzero correction bias, n_group 4 and
#   topk_group 2, norm_topk_prob, routed_scaling_factor 2.5, first_k_dense_replace 1,
#   YaRN factor 4 with mscale_all_dim set.
# tiny_v2: softmax, group_limited_greedy.   tiny_v2_lite: q_lora_rank null, greedy, no groups.
FAMILIES = ["tiny_v3", "tiny_v2", "tiny_v2_lite"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  out = {}
  for name in FAMILIES:
    cfg = get_preset(name)
    if name == "tiny_v3":
      cfg = cfg.replace(routed_scaling_factor=2.5)
    d = tmp_path_factory.mktemp(name)
    model = save_hf(cfg, d, seed=1)
    ids = np.random.RandomState(7).randint(0, cfg.vocab_size, (2, 13))  # batch 2, odd length
    out[name] = (d, ids, hf_logits(model, ids))
  return out


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("dispatch", ["dense", "ragged", "blocked", "capacity"])
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_logits_match_transformers(checkpoints, name, dispatch, scan):
  d, ids, ref = checkpoints[name]
  model = from_pretrained(d, dtype=jnp.float32, moe_dispatch=dispatch, scan_layers=scan)
  ours = np.asarray(model(jnp.asarray(ids, jnp.int32)))
  assert ours.dtype == np.float32 and ours.shape == ref.shape
  assert np.abs(ours - ref).max() <= 1e-4


def test_v3_routing_is_nontrivial(checkpoints):
  """The parity above would be weak if the bias never changed a choice: check that it does."""
  from deepseek_jax.moe import route
  cfg = get_preset("tiny_v3")
  rng = np.random.RandomState(0)
  logits = jnp.asarray(rng.randn(64, cfg.n_routed_experts) * 0.3, jnp.float32)
  bias = jnp.asarray(rng.randn(cfg.n_routed_experts) * 0.3, jnp.float32)
  with_bias = route(cfg, logits, bias)
  without = route(cfg, logits, jnp.zeros_like(bias))
  assert not np.array_equal(np.sort(with_bias.topk_idx, -1), np.sort(without.topk_idx, -1))
  # the weights come from the raw scores, so the bias never enters them directly
  np.testing.assert_allclose(
      np.asarray(with_bias.topk_weight).sum(-1), cfg.routed_scaling_factor, rtol=1e-5)
