"""Fine-tuning released weights: LoRA chat SFT through the trainer (held-out loss, resume), a
frozen base in int8 or FP8, and the merged model exported for transformers."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import from_pretrained, get_preset, metrics, trainer
from deepseek_jax.export_hf import export_any
from deepseek_jax.params import flat_state
from deepseek_jax.tokenizer import ByteTokenizer, save_tokenizer
from deepseek_jax.train_config import TrainConfig
from hf_reference import save_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(n, seed):
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    a, b = rng.randint(0, 40), rng.randint(0, 40)
    out.append({"messages": [{"role": "system", "content": "Add."},
                             {"role": "user", "content": f"{a}+{b}="},
                             {"role": "assistant", "content": str(a + b)}]})
  return out


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  """A tiny released-layout checkpoint, chat data and held-out data."""
  root = tmp_path_factory.mktemp("ft")
  save_hf(get_preset("tiny_v3", num_nextn_predict_layers=0), root / "base", seed=3)
  save_tokenizer(ByteTokenizer(), root / "base")  # the base carries its tokenizer, as releases do
  for name, n, seed in (("train", 200, 0), ("eval", 24, 1)):
    (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(n, seed)))
  return root


def _tc(root, workdir, **kw):
  base = dict(init_from=str(root / "base"), data=str(root / "train.jsonl"), data_format="chat",
              eval_data=str(root / "eval.jsonl"), lora_rank=8, seq_len=64, batch_size=8,
              learning_rate=1e-2, warmup_steps=0, log_every=4, eval_every=4, save_every=8,
              peak_flops=1e11, progress=False, tensorboard=False, workdir=str(workdir))
  return TrainConfig(**{**base, **kw})


def test_lora_chat_run_lowers_held_out_loss_and_resumes_exactly(release, tmp_path):
  trainer.train(_tc(release, tmp_path / "straight", steps=16, decay_steps=16),
                echo=lambda _: None)
  recs = metrics.read_jsonl(str(tmp_path / "straight" / "metrics.jsonl"))
  evals = [r["eval_loss"] for r in recs if "eval_loss" in r]
  assert len(evals) == 4 and evals[-1] < evals[0] - 0.3, evals
  # stopped at step 8 and started again: the same losses as the uninterrupted run
  trainer.train(_tc(release, tmp_path / "twice", steps=8, decay_steps=16), echo=lambda _: None)
  trainer.train(_tc(release, tmp_path / "twice", steps=16, decay_steps=16), echo=lambda _: None)
  again = {r["step"]: r for r in metrics.read_jsonl(str(tmp_path / "twice" / "metrics.jsonl"))}
  assert set(r["step"] for r in recs) <= set(again)  # (the resumed run logs its first step too)
  for b in recs:
    a = again[b["step"]]
    assert a["loss"] == b["loss"] and a.get("eval_loss") == b.get("eval_loss"), (a, b)
  # the workdir holds the adapters, their moments and the router biases: the frozen base comes
  # from --init_from on resume
  import orbax.checkpoint as ocp
  tree = ocp.PyTreeCheckpointer().metadata(
      str(tmp_path / "straight" / "checkpoints" / "16" / "state")).item_metadata.tree
  assert set(tree) == {"params", "rest", "opt_state", "step"}
  from deepseek_jax.params import flatten
  assert all("lora_" in p for p in flatten(tree["params"]))


@pytest.mark.torch
def test_merged_lora_exports_to_transformers(release, tmp_path):
  import transformers
  from hf_reference import hf_logits
  trainer.train(_tc(release, tmp_path / "run", steps=4, save_every=4), echo=lambda _: None)
  merged = from_pretrained(tmp_path / "run", dtype=jnp.float32)
  assert merged.cfg.lora_rank == 0
  base = from_pretrained(release / "base", dtype=jnp.float32)
  ids = np.array([[5, 9, 200, 33, 7, 61]], np.int32)
  assert float(jnp.max(jnp.abs(merged(jnp.asarray(ids)) - base(jnp.asarray(ids))))) > 1e-4
  export_any(tmp_path / "run", tmp_path / "hf")
  hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype="float32")
  np.testing.assert_allclose(hf_logits(hf.eval(), ids), np.asarray(merged(jnp.asarray(ids))),
                             atol=1e-4, rtol=1e-4)
  r = subprocess.run([sys.executable, "-m", "deepseek_jax.convert.orbax_to_hf",
                      f"--checkpoint_dir={tmp_path / 'run'}", f"--output_dir={tmp_path / 'cli'}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr[-2000:]
  assert os.path.isfile(tmp_path / "cli" / "config.json")


@pytest.mark.parametrize("mode, tolerance", [("int8", 0.25), ("fp8", 0.4)])
def test_quantized_base_is_small_and_close_to_bfloat16(release, mode, tolerance):
  """Measured on this tiny random model (its routing amplifies small changes): relative L2 error
  of the logits against the bf16 model about 0.10 for int8 and 0.20 for fp8, where bf16 itself
  is 0.10 from float32; bytes 54% and 51% of the bf16 model."""
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 512, (4, 16)), jnp.int32)
  ref = from_pretrained(release / "base", dtype=jnp.bfloat16, moe_dispatch="dense")
  q = from_pretrained(release / "base", dtype=jnp.bfloat16, moe_dispatch="dense",
                      weight_quant=mode)

  def nbytes(m):
    return sum(v.size * v.dtype.itemsize for v in flat_state(m).values())
  assert nbytes(q) <= 0.55 * nbytes(ref), nbytes(q) / nbytes(ref)
  stored = {str(v.dtype) for p, v in flat_state(q).items()
            if p.endswith(("kernel", "proj", "embedding")) and not p.endswith("gate.kernel")}
  assert stored == {"int8" if mode == "int8" else "float8_e4m3fn"}
  a, b = q(ids).astype(jnp.float32), ref(ids).astype(jnp.float32)
  assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < tolerance


def test_lora_on_a_quantized_base_trains(release, tmp_path):
  last = trainer.train(_tc(release, tmp_path / "q", steps=4, base_dtype="int8", eval_data=None),
                       echo=lambda _: None)
  assert np.isfinite(last["loss"])
  with pytest.raises(ValueError, match="--base_dtype=int8 stores a frozen base"):
    trainer.train(_tc(release, tmp_path / "bad", steps=1, base_dtype="int8", lora_rank=0))


def test_chat_generation_cli(release, tmp_path):
  trainer.train(_tc(release, tmp_path / "run", steps=4, save_every=4, eval_data=None),
                echo=lambda _: None)
  r = subprocess.run([sys.executable, "-m", "deepseek_jax.generate_text",
                      f"--model_dir={tmp_path / 'run'}", "--chat", "--system=Add.",
                      "--prompt=3+4=", "--max_new_tokens=4", "--nowarmup", "--think=strip"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.startswith("3+4=\n") and "tok/s" in r.stdout


def test_think_block_is_shown_or_stripped():
  from deepseek_jax.generate_text import _shown
  text = "<think>\n2+2 is four\n</think>\n\n4"
  assert _shown(text, False, final=True) == text
  assert _shown(text, True, final=False) == "4"
  assert _shown("<think>\nstill thinking", True, final=False) == ""
  assert _shown("no reasoning here", True, final=True) == "no reasoning here"
