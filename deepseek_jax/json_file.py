"""The one reader of the JSON files that sit beside a model (config.json, tokenizer_config.json,
a sharded release's index, adapter_config.json): a file that is missing, not UTF-8, not JSON or
not an object is refused with its path named."""

from __future__ import annotations

import json
import os
from typing import Any


def read_json_object(path: str | os.PathLike, *, error: type[Exception] = ValueError
                     ) -> dict[str, Any]:
  """The JSON object in `path`; `error` (a ValueError subclass, or FileNotFoundError for a missing
  file) names the file and what is wrong with it."""
  p = os.fspath(path)
  if not os.path.isfile(p):
    raise FileNotFoundError(f"{p}: no such file")
  try:
    with open(p, encoding="utf-8") as f:
      raw = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise error(f"{p}: not valid JSON ({e})") from e
  if not isinstance(raw, dict):
    raise error(f"{p}: expected a JSON object, got {type(raw).__name__}")
  return raw
