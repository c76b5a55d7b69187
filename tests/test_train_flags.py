"""The trainer's absl flags are made from TrainConfig's fields: one flag per field, the same
defaults, and parsed flags give the config back; choices are checked on either side."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
from absl import flags

from deepseek_jax.train_config import TrainConfig, flag_specs, from_flag_values

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_one_flag_per_field_and_parsed_flags_give_the_config_back():
  specs = {s.name: s for s in flag_specs()}
  assert list(specs) == [f.name for f in dataclasses.fields(TrainConfig)]
  fv = flags.FlagValues()
  for s in specs.values():
    if s.kind == "enum":
      flags.DEFINE_enum(s.name, s.default, list(s.choices), s.help, flag_values=fv)
    else:
      getattr(flags, f"DEFINE_{s.kind}")(s.name, s.default, s.help, flag_values=fv)
  fv(["prog", "--data=corpus", "--workdir=w", "--seq_len=64", "--data_patterns=*.txt,*.md",
      "--noremat", "--moe_dispatch=dense"])
  tc = from_flag_values({n: fv[n].value for n in specs})
  want = TrainConfig(data="corpus", workdir="w", seq_len=64, data_patterns=("*.txt", "*.md"),
                     moe_dispatch="dense")
  assert tc == want
  assert {n for n, s in specs.items() if s.required} == {"data", "workdir"}
  assert specs["compute_dtype"].choices == ("float32", "bfloat16")


def test_choices_are_checked_in_python_too():
  with pytest.raises(ValueError, match="--moe_dispatch='warp'"):
    TrainConfig(moe_dispatch="warp")


@pytest.mark.parametrize("field,value,says", [
    ("steps", 0, ">= 1"), ("log_every", -1, ">= 1"), ("min_lr_ratio", 1.5, "<= 1.0"),
    ("learning_rate", float("nan"), ">= 0.0"), ("max_data_bytes", 0, ">= 1")])
def test_ranges_are_checked_in_python_and_become_flag_bounds(field, value, says):
  with pytest.raises(ValueError, match=f"--{field}=.*must be {says}"):
    TrainConfig(**{field: value})
  spec = {s.name: s for s in flag_specs()}[field]
  assert spec.lower is not None


def test_cli_help_lists_every_field():
  r = subprocess.run([sys.executable, "-m", "deepseek_jax.train", "--helpshort"], cwd=ROOT,
                     capture_output=True, text=True, timeout=300,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert "Try --helpfull" in r.stdout, r.stderr[-2000:]  # absl exits 1 after help
  missing = [f.name for f in dataclasses.fields(TrainConfig)
             if f"--{f.name}" not in r.stdout and f"--[no]{f.name}" not in r.stdout]
  assert not missing, missing
