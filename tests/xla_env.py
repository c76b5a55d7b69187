"""XLA_FLAGS for a test's subprocess: the suite's own flags (conftest.py sets them in this
process's environment) with the host platform's device count replaced by `devices`."""

from __future__ import annotations

import os
import re


def xla_flags(devices: int) -> str:
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", ""))
  return " ".join(flags.split() + [f"--xla_force_host_platform_device_count={devices}"])
