"""The `torch` marker (`@pytest.mark.torch`, `pytestmark`): tests that compare against torch (the
transformers oracle, a torch formula, or safetensors' torch reader). They run on the oldest
supported stack, which has the torch CPU wheel; the current stack (Python 3.12, no torch wheel on
these machines) runs the suite with `-m "not torch"`, so they are counted there as deselected,
never skipped in silence. Tests that only need a released-layout checkpoint on disk are not
marked: without torch, hf_reference.save_hf writes it with numpy.

A torch-less run that still selects a marked test stops at collection, naming it.
"""

from __future__ import annotations

import importlib.util

import pytest


def pytest_collection_finish(session):
  if importlib.util.find_spec("torch") is not None:
    return
  need = [i.nodeid for i in session.items if i.get_closest_marker("torch")]
  if need:
    raise pytest.UsageError(
        f"torch is not installed but {len(need)} selected tests need it (e.g. {need[0]}): "
        "install the oracle extras, or deselect them with -m 'not torch'")
