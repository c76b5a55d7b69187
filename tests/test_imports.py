"""The package's imports flow one way: each module imports only from its own floor or below, and
no import cycle exists (function-local imports included: a lazy import cannot hide one).

Floors, bottom to top (see the table below): kernels; config and leaf utilities; layers and
dispatch; attention and MoE; the model; parameter I/O (params, checkpoints, convert, sharding);
`from_pretrained`; generation and the training step; the trainer loop; the CLIs and the package's
public face (`deepseek_jax/__init__.py`). Importing a submodule also runs its package's
`__init__`, so that counts as an import of the package too (the root package excepted: Python
always runs it first).
"""

from __future__ import annotations

import ast
import fnmatch
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Folder -> package name (setuptools package-dir mapping in pyproject.toml).
PACKAGES = {"deepseek_jax": "deepseek_jax", "kernels_pallas": "deepseek_jax.kernels_pallas",
            "sharding": "deepseek_jax.sharding", "convert": "deepseek_jax.convert"}

P = "deepseek_jax."
FLOORS = [  # (floor name, module patterns); the first match decides
    ("kernels", [P + "kernels_pallas", P + "kernels_pallas.*"]),
    ("config and leaf utilities", [P + m for m in (
        "config", "json_file", "presets", "dtypes", "tokenizer", "sampling", "losses", "optim",
        "metrics", "data", "train_config", "convert", "convert.fp8", "quant", "chat", "train_data",
        "sandbox", "rewards", "grpo_loss", "grpo_config", "tasks", "distill_loss", "host_memory",
        "cpu_gmm")]),
    ("layers and dispatch", [P + m for m in ("layers", "dispatch", "expert_parallel")]),
    ("attention and MoE", [P + "attention", P + "moe"]),
    ("model", [P + "model"]),
    ("CLIs", [P + m for m in ("cli", "train", "generate_text", "demo", "grpo", "grpo_demo",
                              "distill", "convert.hf_to_orbax",
                              "convert.orbax_to_hf", "convert.plan", "sharding.plan")]
     + ["deepseek_jax"]),
    ("parameter I/O", [P + "params", P + "checkpoint", P + "workdir", P + "adapters",
                       P + "convert.*", P + "sharding", P + "sharding.*"]),
    ("from_pretrained", [P + "pretrained"]),
    ("generation and the training step", [P + "generation", P + "train_step", P + "export_hf",
                                          P + "grpo_step"]),
    ("the trainer loop", [P + "trainer", P + "grpo_trainer", P + "distillation"]),
]
ORDER = ["kernels", "config and leaf utilities", "layers and dispatch", "attention and MoE",
         "model", "parameter I/O", "from_pretrained", "generation and the training step",
         "the trainer loop", "CLIs"]


def modules() -> dict[str, pathlib.Path]:
  out = {}
  for folder, pkg in PACKAGES.items():
    for path in sorted((ROOT / folder).rglob("*.py")):
      rel = path.relative_to(ROOT / folder).with_suffix("")
      parts = [] if rel.name == "__init__" else [rel.name]
      parts = list(rel.parent.parts) + parts
      out[".".join([pkg, *parts])] = path
  return out


def floor_of(module: str) -> int:
  for name, patterns in FLOORS:
    if any(fnmatch.fnmatchcase(module, p) for p in patterns):
      return ORDER.index(name)
  raise AssertionError(f"{module} has no floor: add it to FLOORS in {__file__}")


def imports(module: str, path: pathlib.Path, known: set[str]) -> set[str]:
  """Our modules that `module` imports anywhere in its file, with their parent packages."""
  is_pkg = path.name == "__init__.py"
  out = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = module if is_pkg else module.rpartition(".")[0]
        for _ in range(node.level - 1):
          anchor = anchor.rpartition(".")[0]
        base = f"{anchor}.{base}" if base else anchor
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    for name in names:
      if not (name == "deepseek_jax" or name.startswith(P)):
        continue
      while name not in known and "." in name:  # `import a.b.attr`-style: the module part
        name = name.rpartition(".")[0]
      out.add(name)
      parent = name.rpartition(".")[0]
      while parent and parent != "deepseek_jax":
        # importing a submodule runs its package's __init__, unless the importer lives in that
        # package (then the package is already being, or has been, imported)
        if not (module + ".").startswith(parent + "."):
          out.add(parent)
        parent = parent.rpartition(".")[0]
  out.discard(module)
  return out


def graph() -> dict[str, set[str]]:
  mods = modules()
  return {m: imports(m, p, set(mods)) for m, p in mods.items()}


def test_every_module_has_a_floor_and_imports_only_downward():
  bad = []
  for mod, deps in graph().items():
    for dep in sorted(deps):
      if floor_of(dep) > floor_of(mod):
        bad.append(f"{mod} ({ORDER[floor_of(mod)]}) imports {dep} ({ORDER[floor_of(dep)]})")
  assert not bad, "upward imports:\n  " + "\n  ".join(bad)


def test_no_import_cycle():
  g = graph()
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(m: str):
    state[m] = 1
    stack.append(m)
    for d in sorted(g.get(m, ())):
      if state.get(d) == 1:
        cycle = stack[stack.index(d):] + [d]
        raise AssertionError("import cycle: " + " -> ".join(cycle))
      if d not in state:
        visit(d)
    stack.pop()
    state[m] = 2

  for m in sorted(g):
    if m not in state:
      visit(m)


def test_checker_sees_upward_and_lazy_imports(tmp_path):
  """The checker itself: a function-local upward import and a cycle are caught."""
  lazy = tmp_path / "m.py"
  lazy.write_text("def f():\n  from deepseek_jax.trainer import train\n")
  deps = imports("deepseek_jax.model", lazy, set(modules()))
  assert "deepseek_jax.trainer" in deps and floor_of("deepseek_jax.trainer") > floor_of(
      "deepseek_jax.model")
  sub = tmp_path / "s.py"
  sub.write_text("from deepseek_jax.sharding.rules import spec_for\n")
  deps = imports("deepseek_jax.moe", sub, set(modules()))
  assert "deepseek_jax.sharding" in deps  # the package __init__ runs too
