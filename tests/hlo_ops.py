"""Ops of a compiled XLA program that produce an array of given sizes (one layer's latent cache,
or a weight): a test helper (tests/test_decode_cache.py) that bench/long_context.py
--profile_step also uses.

Reads only opcodes and what each fusion calls from `compiled.as_text()`, so it holds across XLA
versions that name their fusions differently.
"""

from __future__ import annotations

import collections
import re

import numpy as np


def _computations(hlo: str) -> dict[str, list[str]]:
  """Computation name -> its instruction lines, from an HloModule's text."""
  comps, name = {}, None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$", line)
    if head:
      name = head.group(1)
      comps[name] = []
    elif line.strip() == "}":
      name = None
    elif name is not None and "=" in line:
      comps[name].append(line)
  return comps


_INST = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*\w+\[([\d,]*)\]\S*\s+([\w\-]+)\(")
_VIEWS = {"parameter", "bitcast", "get-tuple-element", "tuple", "constant"}
_IN_PLACE = {"dynamic-update-slice", "scatter"}
# what XLA fuses beside a dynamic-slice to clamp its start indices (scalars)
_INDEX_MATH = {"add", "subtract", "compare", "select", "clamp", "minimum", "maximum", "convert"}


def while_bodies(hlo: str) -> set[str]:
  """The names of the computations that run as while loops' bodies (nested loops' too)."""
  return set(re.findall(r"\bbody=%?([\w.\-]+)", hlo))


def whole_cache_ops(hlo: str, sizes: set[int], within: set[str] | None = None
                    ) -> collections.Counter:
  """Counts the ops (outside fused computations) whose result has as many elements as a size in
  `sizes` (one layer's cache array, or a layer stack's), by kind: "in-place update" for a
  dynamic-update-slice or scatter or a fusion that computes one; "dynamic-slice" for one or a
  fusion of one with the arithmetic that clamps its start indices (a copy of a slice: a layer's
  view of a stacked cache); a fusion otherwise as "fusion: <its opcodes>"; any other op by its
  opcode (`copy`, `transpose`, ...). Views (parameters, bitcasts, tuple elements) are not
  counted: they move no data. `within`: only the ops of these computations (e.g.
  `while_bodies(hlo)`)."""
  comps = _computations(hlo)
  fused = set()
  for lines in comps.values():
    for line in lines:
      if re.search(r"\sfusion\(", line):
        fused.update(re.findall(r"calls=%?([\w.\-]+)", line))
  ops = collections.Counter()
  for name, lines in comps.items():
    if name in fused or (within is not None and name not in within):
      continue
    for line in lines:
      m = _INST.match(line)
      if not m or m.group(2) in _VIEWS:
        continue
      dims = [int(d) for d in m.group(1).split(",") if d]
      if int(np.prod(dims)) not in sizes:
        continue
      op = m.group(2)
      if op == "fusion":
        called = [l for c in re.findall(r"calls=%?([\w.\-]+)", line) for l in comps.get(c, [])]
        inner = {m.group(2) for m in map(_INST.match, called) if m} - _VIEWS
        if inner & _IN_PLACE:
          op = "in-place update"
        elif "dynamic-slice" in inner and inner <= _INDEX_MATH | {"dynamic-slice"}:
          op = "dynamic-slice"
        else:
          op = "fusion: " + ",".join(sorted(inner))
      elif op in _IN_PLACE:
        op = "in-place update"
      ops[op] += 1
  return ops
