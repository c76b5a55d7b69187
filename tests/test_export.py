"""Portability: the forward pass, one training step and one decode step lower for TPU, CUDA and
ROCm from this CPU (jax.export), each with that platform's default MoE dispatch and decode
attention: the Pallas kernels, Mosaic TPU on TPUs and Triton on GPUs. No switch is flipped: the
kernels are interpreted only where the program is lowered for the CPU
(`kernels_pallas.per_platform`). GPU exports name their target device with
`kernels_pallas.abstract_gpu` (its compute capability reaches Triton; its kind picks the block
sizes). Each test asserts the kernels it finds by custom-call target and kernel name."""

import contextlib

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from deepseek_jax import dispatch, get_preset
from deepseek_jax.attention import use_decode_kernel
from deepseek_jax.kernels_pallas import abstract_gpu
from deepseek_jax.model import DeepseekForCausalLM
from deepseek_jax.train_config import TrainConfig
from deepseek_jax.train_step import make_train_step
from test_kernels_export import GPU_CHECKS, TRITON, custom_calls

# platform -> (device kind named for GPUs, custom-call target of the Pallas kernels)
PLATFORMS = {
    "tpu": (None, "tpu_custom_call"),
    "cuda": ("NVIDIA H100 80GB HBM3", TRITON),
    "rocm": ("gfx942", TRITON),
}
# Kernel names per platform family: (grouped matmul, its tgmm, MLA decode).
NAMES = {"tpu": ("gmm", "tgmm", "mla_decode"),
         "gpu": ("gmm_triton", "tgmm_triton", "mla_decode_triton")}


@pytest.fixture
def lower_for():
  """Exports f(*args) for one platform and returns the Pallas kernels its module calls, as
  {kernel name: count}; a failure names the platform and the op that failed."""
  def run(platform, f, *args):
    kind, target = PLATFORMS[platform]
    gpu = kind is not None
    try:
      with abstract_gpu(kind) if gpu else contextlib.nullcontext():
        exported = jax.export.export(jax.jit(f), platforms=(platform,),
                                     disabled_checks=GPU_CHECKS if gpu else ())(*args)
    except Exception as e:  # noqa: BLE001 - re-raised with the platform named
      pytest.fail(f"does not lower for {platform}: {type(e).__name__}: {str(e)[:2000]}")
    calls = custom_calls(exported.mlir_module())
    kernels = {}
    for t, name in calls:
      if t == target:
        kernels[name] = kernels.get(name, 0) + 1
    return kernels, calls
  return run


def _names(platform):
  return NAMES["tpu" if platform == "tpu" else "gpu"]


def _model(platform):
  """tiny_v3 with what "auto" picks on `platform` (this process's backend is the CPU)."""
  family = "tpu" if platform == "tpu" else "gpu"
  cfg = get_preset("tiny_v3", moe_dispatch=dispatch.default_method(family))
  cfg = cfg.replace(mla_decode="pallas" if use_decode_kernel(cfg, family) else "xla")
  assert (cfg.moe_dispatch, cfg.mla_decode) == ("pallas", "pallas")
  return cfg, DeepseekForCausalLM(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_forward_lowers(platform, lower_for):
  cfg, model = _model(platform)
  graphdef, state = nnx.split(model)
  kernels, calls = lower_for(platform, lambda s, ids: nnx.merge(graphdef, s)(ids), state,
                             jnp.zeros((2, 16), jnp.int32))
  gmm_name = _names(platform)[0]
  # three grouped matmuls (gate, up, down) per MoE layer (the plain forward runs no MTP layer)
  moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
  assert kernels == {gmm_name: 3 * moe_layers}, calls


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_train_step_lowers(platform, lower_for):
  cfg, model = _model(platform)
  tc = TrainConfig(steps=10, warmup_steps=1)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adamw(1e-3)
  step = make_train_step(graphdef, tx, cfg, tc)
  state = {"params": params, "rest": rest, "opt_state": tx.init(params),
           "step": jnp.zeros((), jnp.int32)}
  kernels, calls = lower_for(platform, step, state, jnp.zeros((1, 2, 17), jnp.int32))
  gmm_name, tgmm_name, _ = _names(platform)
  # forward and backward: each grouped matmul's d_lhs is one more gmm and its d_rhs one tgmm
  assert set(kernels) == {gmm_name, tgmm_name}, calls
  assert kernels[gmm_name] == 2 * kernels[tgmm_name] > 0, calls


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_decode_step_lowers(platform, lower_for):
  cfg, model = _model(platform)
  graphdef, state = nnx.split(model)
  cache = model.init_cache(2, 32)

  def decode(s, cache, tok, pos):
    out = nnx.merge(graphdef, s).forward(tok, positions=pos, cache=cache, absorb=True,
                                         with_mtp=False)
    return out.logits, out.cache

  kernels, calls = lower_for(platform, decode, state, cache, jnp.zeros((2, 1), jnp.int32),
                             jnp.full((2, 1), 5, jnp.int32))
  gmm_name, _, decode_name = _names(platform)
  # one flash-decoding kernel per layer; the MoE layers' grouped matmuls
  moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
  assert kernels == {decode_name: cfg.num_hidden_layers, gmm_name: 3 * moe_layers}, calls
