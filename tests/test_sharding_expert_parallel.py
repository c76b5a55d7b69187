"""expert_parallel_moe on 8 host CPU devices (in a subprocess) equals the dense dispatch."""

from __future__ import annotations

import pytest

from sharding_worker import run as run_worker


@pytest.fixture(scope="module")
def results():
  return run_worker("ep")


def test_dropless_equals_dense_forward_and_gradients(results):
  runs = [r for r in results if "mesh" in r and r["capacity_factor"] is None]
  assert len(runs) == 9  # 3 meshes x 3 routings
  for r in runs:
    assert r["err"] <= 1e-5 * max(1.0, r["ref_max"]), r
    assert r["grad_err"] <= 1e-5 * max(1.0, r["grad_max"]), r


def test_capacity_factor_bounds_buffers_and_drops_overflow(results):
  capped = {(tuple(sorted(r["mesh"].items())), r["routing"]): r for r in results
            if "mesh" in r and r["capacity_factor"] == 1.0}
  for (mesh, routing), r in capped.items():
    assert r["finite"], r
    if routing == "balanced":   # every destination gets exactly its share: nothing dropped
      assert r["err"] <= 1e-5 * r["ref_max"], r
    else:                       # overflow dropped: the result differs from the dropless one
      assert r["err"] > 1e-2, r
  assert any(r["error"] == "capacity_factor=0.0: must be > 0 (or None for dropless)"
             for r in results if "error" in r)


def test_capacity_method_under_expert_parallelism_equals_dense(results):
  (r,) = [r for r in results if r.get("capacity_method")]
  assert r["err"] <= 1e-5 * max(1.0, r["ref_max"]), r
  assert r["grad_err"] <= 1e-5 * max(1.0, r["grad_max"]), r


def test_any_token_count_through_the_context_mesh(results):
  odd = {r["odd_tokens"]: r for r in results if "odd_tokens" in r}
  assert sorted(odd) == [1, 13]  # 8 token shards: padded with expert-less tokens, then cut
  for n, r in odd.items():
    assert r["shape"] == [n, 16] and r["err"] <= 1e-5, r


def test_shard_activation_inside_and_outside_a_mesh(results):
  r = next(r for r in results if "activation" in r)
  assert r["activation"] == "P('data',)"       # batch over data (fsdp is 1) on data 2 x expert 4
  assert r["activation_b1"] == "P()"            # a batch of 1 does not split: left whole
  assert r["activation_outside"] == "SingleDeviceSharding" and r["activation_ok"]
