"""The colab/ notebooks run top to bottom on the CPU with tiny parameters (papermill style).

Each notebook is executed with nbclient in a kernel started from this interpreter (a kernelspec
written to a temporary directory, so no user-installed kernel is needed or used), with the cell
tagged `parameters` followed by an injected cell of tiny CI values; any cell error fails the
test. The checks on the committed files (outputs cleared, one parameters cell, an install cell
first, no machine-specific paths) keep the notebooks fit for Colab.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import sys

import pytest
from xla_env import xla_flags

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLAB = ROOT / "colab"
NOTEBOOKS = sorted(p.name for p in COLAB.glob("*.ipynb"))
KERNEL = "deepseek-jax-test"
CELL_TIMEOUT_S = 600
# The release's special tokens; ids 0 and 1, as the tiny_v2_lite preset's bos/eos say.
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

# Tiny values injected after each notebook's parameters cell; {tmp} is the test's directory and
# {hf_dir} the locally generated checkpoint. Every notebook must have an entry here.
CI_PARAMS = {
    "01_quickstart.ipynb": dict(
        steps=4, seq_len=32, batch_per_device=2, corpus_mb=0.05, hidden_size=32, num_layers=2,
        new_tokens=8, workdir="{tmp}/quickstart"),
    "02_convert_and_generate.ipynb": dict(
        hf_dir="{hf_dir}", output_dir="{tmp}/orbax", dtype="float32", mesh_axes={"expert": -1},
        prompts=["hello world", "def"], max_new_tokens=6),
    "03_experts_and_sharding.ipynb": dict(
        overrides={}, batch=4, seq_len=16, repeats=1, mesh_axes={"expert": -1},
        plan_rows=[("v5p-256", "train", {"fsdp": 16, "expert": 8}),
                   ("v6e-256", "infer", {"expert": 32, "tensor": 8})]),
    "04_finetune_lora.ipynb": dict(
        base_dir="{hf_dir}", workdir="{tmp}/lora", lora_rank=4, base_dtype="int8",
        mesh_axes={"data": 1, "fsdp": -1, "expert": 1, "tensor": 1}, seq_len=128, batch_size=4,
        steps=4, learning_rate=5e-3, examples=40, max_new_tokens=4),
    "05_grpo.ipynb": dict(
        workdir="{tmp}/grpo", sft_steps=3, grpo_steps=2, group_size=2, prompts_per_step=2,
        train_problems=40, held_out=8, hidden_size=32, num_layers=2,
        mesh_axes={"data": -1, "fsdp": 1, "expert": 1, "tensor": 1}),
}
# Simulated CPU devices per notebook (XLA's host platform device count).
CPU_DEVICES = {"02_convert_and_generate.ipynb": 2, "03_experts_and_sharding.ipynb": 4,
               "04_finetune_lora.ipynb": 2, "05_grpo.ipynb": 2}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> pathlib.Path:
  """A tiny DeepSeek-V2-Lite-layout checkpoint (transformers' save_pretrained) with a tiny BPE
  tokenizer.json whose special tokens carry the release's names."""
  pytest.importorskip("transformers")
  tokenizers = pytest.importorskip("tokenizers")
  from hf_reference import save_hf

  from deepseek_jax.presets import get_preset

  path = tmp_path_factory.mktemp("hf_tiny")
  save_hf(get_preset("tiny_v2_lite"), path)
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=[BOS, EOS], show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["hello world, def fibonacci(n): return n"] * 4, trainer)
  tok.save(str(path / "tokenizer.json"))
  return path


def _kernel_manager(tmp_path: pathlib.Path, devices: int):
  """A kernel manager whose only kernelspec runs ipykernel on this interpreter, on the CPU."""
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import AsyncKernelManager

  spec_dir = tmp_path / "kernels" / KERNEL
  spec_dir.mkdir(parents=True)
  # The repository first on the path: the package is importable (so the install cell skips)
  # whether or not it is pip-installed, and `python -m deepseek_jax.convert...` from a cell finds it too.
  path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
  env = {"PYTHONPATH": path, "JAX_PLATFORMS": "cpu",
         "MPLBACKEND": "module://matplotlib_inline.backend_inline",
         "XLA_FLAGS": xla_flags(devices)}
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "deepseek-jax test", "language": "python", "env": env}))
  ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
  return AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=ksm)


def _inject(nb, params: dict) -> None:
  """Inserts a cell assigning `params` right after the cell tagged `parameters`."""
  idx = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(idx) == 1, "expected exactly one cell tagged 'parameters'"
  src = "\n".join(f"{k} = {v!r}" for k, v in params.items())
  cell = nbformat.v4.new_code_cell(src)
  cell.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(idx[0] + 1, cell)


def metrics_rows(path) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _outputs(nb) -> list[dict]:
  return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def _text(nb) -> str:
  out = []
  for o in _outputs(nb):
    if o.get("output_type") == "stream":
      out.append(o.get("text", ""))
    elif "data" in o and "text/plain" in o["data"]:
      out.append(o["data"]["text/plain"])
  return "".join(out)


def test_every_notebook_has_ci_parameters():
  assert NOTEBOOKS, f"no notebooks in {COLAB}"
  assert set(NOTEBOOKS) == set(CI_PARAMS), "register each notebook's tiny parameters in CI_PARAMS"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_clean_for_colab(name):
  """Outputs cleared, install cell first, one parameters cell, every code cell explained, and no
  path of one machine."""
  nb = nbformat.read(COLAB / name, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  for c in code:
    assert not c.outputs and c.execution_count is None, f"{name}: outputs not cleared"
  assert "find_spec(\"deepseek_jax\")" in code[0].source and "pip" in code[0].source, (
      f"{name}: the first code cell must install deepseek-jax when it is not importable")
  tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1 and tagged[0].cell_type == "code", f"{name}: one parameters cell"
  for prev, cell in zip(nb.cells, nb.cells[1:]):
    if cell.cell_type == "code" and cell is not code[0]:
      assert prev.cell_type == "markdown", f"{name}: a code cell without a sentence before it"
  for c in nb.cells:
    assert not re.search(r"(/work/|/home/|/Users/|/tmp/|[A-Z]:\\\\)", c.source), (
        f"{name}: machine-specific path in {c.source[:80]!r}")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_on_cpu(name, tmp_path, request):
  nb = nbformat.read(COLAB / name, as_version=4)
  fmt = {"tmp": tmp_path}
  if any("{hf_dir}" in str(v) for v in CI_PARAMS[name].values()):
    fmt["hf_dir"] = request.getfixturevalue("hf_dir")
  params = {k: v.format(**fmt) if isinstance(v, str) else v
            for k, v in CI_PARAMS[name].items()}
  _inject(nb, params)
  km = _kernel_manager(tmp_path, CPU_DEVICES.get(name, 1))
  client = nbclient.NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, startup_timeout=180,
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute(cleanup_kc=True)  # raises CellExecutionError naming the cell on any error; kernel shut down
  errors = [o for o in _outputs(nb) if o.get("output_type") == "error"]
  assert not errors, errors
  text = _text(nb)
  if name.startswith("01_"):
    assert "backend: cpu" in text
    assert any("image/png" in o.get("data", {}) for o in _outputs(nb)), "no loss plot"
    assert os.path.isfile(tmp_path / "quickstart" / "metrics.jsonl")
    assert "def fibonacci(n):" in text
  if name.startswith("02_"):
    assert "backend: cpu - 2 device(s)" in text and "'expert': 2" in text
    assert os.path.isfile(tmp_path / "orbax" / "config.json")
    assert "P('expert'," in text  # the experts are split over the chips
    completions = re.findall(r"^'(hello world|def).*'$", text, re.M)
    assert len(completions) == 2, text[-2000:]
  if name.startswith("04_"):
    assert "backend: cpu - 2 device(s)" in text and "held-out loss by step:" in text
    assert os.path.isfile(tmp_path / "lora" / "merged-hf" / "config.json")
    assert os.path.isfile(tmp_path / "lora" / "merged-hf" / "tokenizer.json")
  if name.startswith("05_"):
    assert "backend: cpu - 2 device(s)" in text and "held-out accuracy:" in text
    assert len(metrics_rows(tmp_path / "grpo" / "grpo" / "metrics.jsonl")) == 2
    assert any("image/png" in o.get("data", {}) for o in _outputs(nb)), "no reward plot"
  if name.startswith("03_"):
    assert "backend: cpu - 4 device(s)" in text and "'expert': 4" in text
    diffs = [float(x) for x in re.findall(r"max \|[^|]*\| ([0-9.e+-]+)", text)]
    assert len(diffs) == 3 and max(diffs) < 1e-4, diffs  # sharded, expert parallel, absorbed
    tables = [o["data"]["text/markdown"] for o in _outputs(nb)
              if "text/markdown" in o.get("data", {})]
    assert tables and "| v5p-256 | train |" in tables[0]
    assert sum("image/png" in o.get("data", {}) for o in _outputs(nb)) == 2  # load, memory plan
