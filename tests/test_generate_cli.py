"""The generation CLI (`python -m deepseek_jax.generate_text`): streamed text, timings, tokenizer
choice, and `deepseek_jax.generate` staying the function whatever is imported."""

import io
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

import deepseek_jax
from deepseek_jax import from_pretrained, generate_text, generation, get_preset
from deepseek_jax.tokenizer import ByteTokenizer, tokenizer_for_model
from hf_reference import save_hf
from xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tiny_v2_lite")
  save_hf(get_preset("tiny_v2_lite"), d, seed=2)
  return str(d)


def test_run_streams_the_same_text_as_generate(model_dir):
  model = from_pretrained(model_dir, dtype=jnp.float32)
  tok = ByteTokenizer()
  out = io.StringIO()
  texts = generation_run(model, tok, ["Hello", "Hi"], out)
  ids = [[tok.bos_id] + tok.encode(p) for p in ("Hello", "Hi")]
  want = [tok.decode(r) for r in generation.generate(model, ids, 20, eos_id=tok.eos_id)]
  assert texts == want
  printed = out.getvalue()
  assert printed.startswith("Hello" + want[0]) and "prefill:" in printed and "decode:" in printed


def generation_run(model, tok, prompts, out):
  return generate_text.run(model, tok, prompts, max_new_tokens=20, chunk=4, warmup=False, out=out)


def test_package_generate_is_the_function():
  """The CLI module has its own name, so importing it cannot rebind `deepseek_jax.generate`."""
  assert deepseek_jax.generate is generation.generate and callable(deepseek_jax.generate)


def test_tokenizer_json_is_used(tmp_path, model_dir):
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {w: i for i, w in enumerate(["[UNK]", "hello", "world", "again"])}
  t = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  t.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  for name in os.listdir(model_dir):
    os.symlink(os.path.join(model_dir, name), tmp_path / name)
  t.save(str(tmp_path / "tokenizer.json"))
  tok = tokenizer_for_model(str(tmp_path))
  assert tok.encode("hello world") == [1, 2]


def test_cli_end_to_end(model_dir):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  res = subprocess.run(
      [sys.executable, "-m", "deepseek_jax.generate_text", f"--model_dir={model_dir}", "--prompt=Hi",
       "--max_new_tokens=5", "--temperature=0.8", "--top_k=5", "--nowarmup", "--tokenizer=byte",
       "--router_dtype=bfloat16"],
      capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
  assert res.returncode == 0, res.stderr
  assert res.stdout.startswith("Hi") and "tok/s" in res.stdout
  assert res.stderr == ""  # quiet: it logged 27 Orbax and JAX lines
  bad = subprocess.run([sys.executable, "-m", "deepseek_jax.generate_text", f"--model_dir={ROOT}/tests",
                        "--prompt=Hi"], capture_output=True, text=True, env=env, timeout=300,
                       cwd=ROOT)
  assert bad.returncode != 0 and "not a model directory" in bad.stderr


def test_cli_on_a_two_device_mesh_prints_the_same_text(model_dir):
  def cli(*extra, devices=1):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS=xla_flags(devices))
    res = subprocess.run(
        [sys.executable, "-m", "deepseek_jax.generate_text", f"--model_dir={model_dir}",
         "--prompt=Hello", "--max_new_tokens=12", "--nowarmup", "--tokenizer=byte", *extra],
        capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    return res.stdout.split("--- prefill")[0]
  one = cli()
  assert one.startswith("Hello") and len(one) > len("Hello\n")
  assert cli("--mesh=expert=-1", devices=2) == one  # experts split over 2 devices, same greedy text
  bad = subprocess.run([sys.executable, "-m", "deepseek_jax.generate_text", f"--model_dir={model_dir}",
                        "--prompt=Hi", "--mesh=experts=2"], capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT), timeout=300,
                       cwd=ROOT)
  assert bad.returncode != 0 and "--mesh=experts=2" in bad.stderr


def test_orbax_checkpoint_generates_like_its_source(model_dir, tmp_path):
  from deepseek_jax.convert.to_orbax import convert
  orbax_dir = convert(model_dir, tmp_path / "orbax", dtype=jnp.float32)
  from_orbax = from_pretrained(orbax_dir, dtype=jnp.float32)
  from_safetensors = from_pretrained(model_dir, dtype=jnp.float32)
  assert from_orbax.cfg == from_safetensors.cfg
  assert (generation.generate(from_orbax, [[3, 4, 5], [7]], 6, eos_id=-1)
          == generation.generate(from_safetensors, [[3, 4, 5], [7]], 6, eos_id=-1))


def test_cli_refuses_a_real_vocabulary_without_a_tokenizer(model_dir):
  """Before: it fell back to the byte tokenizer and printed nonsense."""
  r = subprocess.run([sys.executable, "-m", "deepseek_jax.generate_text", f"--model_dir={model_dir}",
                      "--prompt=Hi", "--max_new_tokens=2"], capture_output=True, text=True,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120, cwd=ROOT)
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
  assert "no tokenizer.json" in lines[0] and "it has 512 ids" in lines[0]
