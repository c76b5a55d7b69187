"""Portability: the forward pass, one training step and one decode step lower for TPU and CUDA
from this CPU (jax.export), each with that platform's default MoE dispatch and decode attention
(the Pallas kernels on TPU). No switch is flipped: the kernels are interpreted only where the
program is lowered for the CPU (`kernels_pallas.per_platform`)."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from deepseek_jax import dispatch, get_preset
from deepseek_jax.attention import use_decode_kernel
from deepseek_jax.model import DeepseekForCausalLM
from deepseek_jax.train_config import TrainConfig
from deepseek_jax.train_step import make_train_step

PLATFORMS = ["tpu", "cuda"]


@pytest.fixture
def lower_for():
  """Exports f(*args) for one platform; a failure names the platform and the op that failed."""
  def run(platform, f, *args):
    try:
      exported = jax.export.export(jax.jit(f), platforms=(platform,))(*args)
    except Exception as e:  # noqa: BLE001 - re-raised with the platform named
      pytest.fail(f"does not lower for {platform}: {type(e).__name__}: {str(e)[:2000]}")
    return exported.mlir_module()
  return run


def _model(platform):
  """tiny_v3 with what "auto" picks on `platform` (this process's backend is the CPU)."""
  cfg = get_preset("tiny_v3", moe_dispatch=dispatch.default_method(platform))
  cfg = cfg.replace(mla_decode="pallas" if use_decode_kernel(cfg, platform) else "xla")
  return cfg, DeepseekForCausalLM(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("platform", PLATFORMS)
def test_forward_lowers(platform, lower_for):
  cfg, model = _model(platform)
  graphdef, state = nnx.split(model)
  text = lower_for(platform, lambda s, ids: nnx.merge(graphdef, s)(ids), state,
                   jnp.zeros((2, 16), jnp.int32))
  if platform == "tpu":
    assert "tpu_custom_call" in text  # the Pallas grouped matmul, not an interpreted loop


@pytest.mark.parametrize("platform", PLATFORMS)
def test_train_step_lowers(platform, lower_for):
  cfg, model = _model(platform)
  tc = TrainConfig(steps=10, warmup_steps=1)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adamw(1e-3)
  step = make_train_step(graphdef, tx, cfg, tc)
  state = {"params": params, "rest": rest, "opt_state": tx.init(params),
           "step": jnp.zeros((), jnp.int32)}
  lower_for(platform, step, state, jnp.zeros((1, 2, 17), jnp.int32))


@pytest.mark.parametrize("platform", PLATFORMS)
def test_decode_step_lowers(platform, lower_for):
  cfg, model = _model(platform)
  graphdef, state = nnx.split(model)
  cache = model.init_cache(2, 32)

  def decode(s, cache, tok, pos):
    out = nnx.merge(graphdef, s).forward(tok, positions=pos, cache=cache, absorb=True,
                                         with_mtp=False)
    return out.logits, out.cache

  text = lower_for(platform, decode, state, cache, jnp.zeros((2, 1), jnp.int32),
                   jnp.full((2, 1), 5, jnp.int32))
  if platform == "tpu":
    assert 'kernel_name = "mla_decode"' in text  # the Pallas flash-decoding kernel, lowered
