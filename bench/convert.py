"""Conversion throughput beside raw read throughput of the same files, and peak host memory.

Generates a float32 released-layout checkpoint (default ~1.5 GB, several shards) with our writer,
then, in one run on the same disk, alternating so load drifts hit every side alike:
  raw read     every tensor's bytes read with our reader (the files' own speed);
  load_hf      streaming load into jax arrays (bfloat16), what from_pretrained does;
  hf_to_orbax  the whole conversion, Orbax checkpoint written (bfloat16).
Throughput is source bytes per second; the ratio is against raw read. Peak RSS growth of each
conversion is measured in a fresh subprocess (ru_maxrss after a tiny warm-up conversion), whose
time excludes its start-up and compilation (the tiny warm-up conversion pays for them).

`--cache=cold` (default) evicts the source files from the page cache before every timed side
(posix_fadvise DONTNEED; no root needed), so each reads from the disk as a first conversion
does; `--cache=warm` reads them from memory, which measures the pipeline's CPU work alone.

  python bench/convert.py [--layers=14] [--dir=/tmp/x] [--repeats=3] [--cache=cold|warm]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from bench import common  # noqa: E402

_CHILD = """
import json, resource, sys, time
import jax, jax.numpy as jnp
from deepseek_jax.convert.load import load_hf
from deepseek_jax.convert.to_orbax import convert
tiny, src, out, what = sys.argv[1:5]
convert(tiny, out + ".warm", dtype=jnp.bfloat16)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = time.perf_counter()
if what == "load_hf":
  _, flat = load_hf(src, dtype=jnp.bfloat16)
  for v in flat.values():
    v.block_until_ready()
    v.delete()
  del flat
else:
  convert(src, out, dtype=jnp.bfloat16)
seconds = time.perf_counter() - t
print(json.dumps({"base": base, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "seconds": seconds}))
"""


def _cfg(layers: int):
  from deepseek_jax import get_preset
  return get_preset("tiny_v2_lite", vocab_size=16384, hidden_size=512, intermediate_size=1024,
                    moe_intermediate_size=512, n_routed_experts=32, n_shared_experts=1,
                    num_experts_per_tok=2, num_hidden_layers=layers, first_k_dense_replace=1,
                    kv_lora_rank=64, num_attention_heads=4, num_nextn_predict_layers=0)


def generate(directory: str, cfg) -> tuple[int, int]:
  """Random float32 weights in the released layout, 200 MB shards; (bytes, largest tensor)."""
  from deepseek_jax.convert import names
  from deepseek_jax.convert.safetensors_write import TensorSpec, write_sharded
  entries = names.entries(cfg)
  specs = [TensorSpec(n, np.dtype(np.float32), e.hf_shape()) for e in entries for n in e.hf]
  rng = np.random.default_rng(0)
  write_sharded(directory, specs, lambda s: rng.standard_normal(s.shape, dtype=np.float32),
                max_shard_size="200MB", overwrite=True,
                extra_files={"config.json": json.dumps(cfg.to_hf())})
  return sum(s.nbytes for s in specs), max(math.prod(e.shape) * 4 for e in entries)


def evict(directory: str) -> None:
  """Drops the directory's files from the page cache (they are clean: nothing is lost)."""
  for name in os.listdir(directory):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      fd = os.open(path, os.O_RDONLY)
      try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
      finally:
        os.close(fd)


def raw_read(directory: str) -> int:
  from deepseek_jax.convert.safetensors_read import SafetensorsDir
  n = 0
  with SafetensorsDir(directory) as d:
    for k in d.keys():
      n += d.read(k).nbytes
  return n


def child(tiny: str, src: str, out: str, what: str) -> dict:
  shutil.rmtree(out, ignore_errors=True)
  shutil.rmtree(out + ".warm", ignore_errors=True)
  r = subprocess.run([sys.executable, "-c", _CHILD, tiny, src, out, what], cwd=ROOT,
                     capture_output=True, text=True, timeout=600,
                     env={**os.environ, "PYTHONPATH": ROOT})
  if r.returncode != 0:
    raise RuntimeError(f"{what} failed:\n{r.stderr[-3000:]}")
  return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--layers", type=int, default=14, help="~100 MB (float32) per layer")
  ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--cache", choices=("cold", "warm"), default="cold")
  ap.add_argument("--quick", action="store_true", help="4 layers, 2 runs")
  args = ap.parse_args()
  if args.quick:
    args.layers, args.repeats = 4, 2
  prepare = evict if args.cache == "cold" else (lambda d: None)
  from deepseek_jax import get_preset
  work = args.dir or tempfile.mkdtemp(prefix="bench_convert_")
  os.makedirs(work, exist_ok=True)
  try:
    src, tiny, out = (os.path.join(work, n) for n in ("hf", "tiny", "orbax"))
    size, largest = generate(src, _cfg(args.layers))
    generate(tiny, get_preset("tiny_v2_lite", num_nextn_predict_layers=0))
    shards = len([f for f in os.listdir(src) if f.endswith(".safetensors")])
    raw_read(src)  # first touch: the raw reads and the conversions then see the same cache state
    times: dict[str, list[float]] = {"raw read": [], "load_hf": [], "hf_to_orbax": []}
    peaks: dict[str, list[int]] = {"load_hf": [], "hf_to_orbax": []}
    for _ in range(args.repeats):
      prepare(src)
      t = time.perf_counter()
      raw_read(src)
      times["raw read"].append(time.perf_counter() - t)
      for what in ("load_hf", "hf_to_orbax"):
        prepare(src)
        r = child(tiny, src, out, what)
        times[what].append(r["seconds"])
        peaks[what].append(r["peak"] - r["base"])
    best = {k: min(v) for k, v in times.items()}
    rows = []
    held = size // 2  # load_hf returns the model (bfloat16): that much RSS is the result itself
    for k, s in best.items():
      gbs = size / s / 1e9
      growth = "-"
      if k == "load_hf":
        growth = f"{max(peaks[k]) / 2**20:.0f} ({(max(peaks[k]) - held) / 2**20:.0f} beyond the result)"
      elif k in peaks:
        growth = f"{max(peaks[k]) / 2**20:.0f}"
      rows.append([k, s, gbs, gbs / (size / best["raw read"] / 1e9), growth])
    print(f"checkpoint: {size / 1e9:.2f} GB float32 in {shards} shards; largest tensor "
          f"{largest / 2**20:.0f} MiB; page cache {args.cache} before each timed side; "
          f"{args.repeats} runs each, best shown; target: hf_to_orbax at 70% of raw read or more")
    print(common.table(["", "seconds", "GB/s", "ratio to raw read", "peak RSS growth (MiB)"], rows))
    result = {
        "machine": common.machine(), "versions": common.versions(), "bytes": size,
        "largest_tensor_bytes": largest, "shards": shards, "cache": args.cache, "seconds": times,
        "peak_rss_growth": peaks,
        "chart": {"title": "Conversion throughput (GB/s of source)",
                  "labels": list(best), "values": [size / s / 1e9 for s in best.values()],
                  "ylabel": "GB/s"},
    }
    common.save_result("convert", result)
  finally:
    if args.dir is None:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
