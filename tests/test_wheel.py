"""The wheel installs one top-level package: `deepseek_jax`, with the folders kernels_pallas/,
sharding/ and convert/ inside it (no top-level `sharding` or `convert`, names that unrelated PyPI
projects own)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
  """Built from a copy of the sources (pip builds in the tree: no build/ left in the checkout)."""
  src = tmp_path_factory.mktemp("src") / "deepseek-jax"
  src.mkdir()
  for name in ("pyproject.toml", "README.md", "deepseek_jax", "kernels_pallas", "sharding",
               "convert"):
    if (ROOT / name).is_dir():
      shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
      shutil.copy(ROOT / name, src / name)
  out = tmp_path_factory.mktemp("wheel")
  r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                      "--disable-pip-version-check", "-w", str(out), str(src)],
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  (whl,) = out.glob("deepseek_jax-*.whl")
  return whl


def test_wheel_has_one_top_level_package(wheel):
  names = zipfile.ZipFile(wheel).namelist()
  top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
  assert top == {"deepseek_jax"}, top
  for sub in ("kernels_pallas", "sharding", "convert"):
    assert f"deepseek_jax/{sub}/__init__.py" in names
  assert "deepseek_jax/convert/hf_to_orbax.py" in names and "deepseek_jax/sharding/plan.py" in names
  assert "deepseek_jax/cpu_gmm.cc" in names  # compiled on first use (deepseek_jax.cpu_gmm)


def test_installed_wheel_imports_namespaced(wheel, tmp_path):
  """Installed alone into a fresh target directory (dependencies from this environment), away
  from the checkout: the subpackages import from it, and the old top-level names do not exist."""
  target = tmp_path / "site"
  r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                      "--disable-pip-version-check", "--target", str(target), str(wheel)],
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  code = (
      "import importlib.util, sys\n"
      f"sys.path.insert(0, {str(target)!r})\n"
      "import deepseek_jax.sharding, deepseek_jax.convert, deepseek_jax.kernels_pallas\n"
      f"assert deepseek_jax.__file__.startswith({str(target)!r}), deepseek_jax.__file__\n"
      f"assert deepseek_jax.sharding.__file__.startswith({str(target)!r})\n"
      "assert all(importlib.util.find_spec(n) is None for n in ('sharding', 'convert', "
      "'kernels_pallas'))\n"
      "import deepseek_jax.cpu_gmm as c\n"
      f"assert c.SOURCE.is_file() and str(c.SOURCE).startswith({str(target)!r})\n"
      "assert c.available()\n"
      "print('ok')\n")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(JAX_PLATFORMS="cpu", XDG_CACHE_HOME=str(tmp_path / "cache"))
  r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                     timeout=300, env=env)
  assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
