"""How every command-line entry point starts and fails: `run(main)` in place of `absl.app.run`.

- Bad input is one line, not a traceback: a flag that does not parse or is out of range, and the
  errors our validation raises (ValueError, KeyError, FileNotFoundError, FileExistsError,
  FloatingPointError, `app.UsageError`), print `<program>: error: <message>` on stderr and exit
  with status 2. Any other exception keeps its traceback (a bug, not bad input). With
  `--verbosity=1` (or higher) the expected errors show their traceback too.
- Quiet by default: absl logging (Orbax's INFO lines, JAX's backend probing) shows warnings and
  errors only, unless `--verbosity` is given.
- `cpu_only=True` (the plan CLIs, which touch no device) pins JAX to the CPU unless JAX_PLATFORMS
  says otherwise, so no accelerator backend is probed.
- `huge_pages=True` (the training CLI, `deepseek_jax.train`) first runs the command again with
  glibc's huge pages for large allocations where the kernel offers them
  (`host_memory.reexec_with_huge_pages`).
"""

from __future__ import annotations

import os
import sys
from typing import Callable

from absl import app, flags, logging

from deepseek_jax import host_memory

EXIT_BAD_INPUT = 2
EXPECTED_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError,
                   FloatingPointError, app.UsageError)


def program_name() -> str:
  """`python -m deepseek_jax.convert.plan` -> "deepseek_jax.convert.plan" (else the script name)."""
  main = sys.modules.get("__main__")
  spec = getattr(main, "__spec__", None)
  if spec is not None and spec.name:
    return spec.name
  return os.path.basename(sys.argv[0] or "deepseek_jax")


def message(error: BaseException) -> str:
  """The error's text as one would say it (a KeyError's own text, not its repr)."""
  if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
    return error.args[0]
  return str(error) or type(error).__name__


def fail(error: BaseException | str) -> None:
  """Prints `<program>: error: <message>` on stderr and exits with status 2."""
  text = error if isinstance(error, str) else message(error)
  sys.stderr.write(f"{program_name()}: error: {text}\n")
  sys.stderr.flush()
  sys.exit(EXIT_BAD_INPUT)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f"{e} (see --helpshort)")
    raise  # unreachable: fail exits


def _verbose() -> bool:
  f = flags.FLAGS["verbosity"]
  return f.present and f.value >= 1


def run(main: Callable[[list[str]], object], *, cpu_only: bool = False,
        huge_pages: bool = False) -> None:
  """`absl.app.run(main)` with the behaviour described in the module docstring."""
  if huge_pages:
    host_memory.reexec_with_huge_pages()

  def wrapped(argv):
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    if cpu_only and "JAX_PLATFORMS" not in os.environ:
      import jax  # pylint: disable=g-import-not-at-top (only the plan CLIs need it here)
      jax.config.update("jax_platforms", "cpu")
    try:
      return main(argv)
    except EXPECTED_ERRORS as e:
      if _verbose():
        raise
      fail(e)

  app.run(wrapped, flags_parser=_parse_flags)
