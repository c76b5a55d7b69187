"""`make bench`: runs every benchmark on the current platform and rewrites bench/RESULTS.md.

Each benchmark is a script in bench/ run in its own process (so each starts from a cold,
uncontended JAX runtime); it prints its table(s) on stdout and may leave bench/results/<name>.json
with a `chart` entry ({"title", "labels", "values", "ylabel"}) that becomes a PNG beside RESULTS.md.
A benchmark that fails or cannot run here gets its reason written into RESULTS.md, never hidden.

  python bench/run_all.py [--only dispatch,train] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from bench import common  # noqa: E402

# (name, script and arguments, timeout seconds, what it compares)
BENCHES = [
    ("dispatch", ["bench/dispatch.py"], 900, "MoE dispatch paths against one dense matmul"),
    ("train", ["bench/train.py"], 900, "training step: ours vs transformers + torch AdamW"),
    ("generate", ["bench/generate.py"], 900, "prefill and decode: ours vs transformers"),
    ("peers", ["bench/peers/run_peers.py"], 1500, "MaxText and EasyDeL on the same config"),
    ("convert", ["bench/convert.py"], 600, "conversion throughput against raw disk reads"),
    ("kernels", ["bench/kernels.py"], 600, "grouped matmul and MLA decode kernels"),
    ("sharding", ["bench/sharding.py"], 600,
     "a MoE layer on 8 devices: expert parallelism vs XLA's partitioning vs one device"),
]


def _chart(name: str) -> str | None:
  path = os.path.join(common.RESULTS_DIR, f"{name}.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    chart = json.load(f).get("chart")
  if not chart:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 3.2))
  ax.barh(chart["labels"], chart["values"], color="#4477aa")
  ax.set_xlabel(chart.get("ylabel", ""))
  ax.set_title(chart.get("title", name))
  if chart.get("reference") is not None:
    ax.axvline(chart["reference"], color="#cc3311", linestyle="--", linewidth=1)
  fig.tight_layout()
  png = f"{name}.png"
  fig.savefig(os.path.join(HERE, png), dpi=110)
  plt.close(fig)
  return png


def run(selected: list[str], quick: bool) -> str:
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  sections = []
  for name, argv, timeout, what in BENCHES:
    if selected and name not in selected:
      continue
    cmd = [sys.executable] + argv + (["--quick"] if quick else [])
    shown = "python " + " ".join(argv + (["--quick"] if quick else []))
    print(f"== {name}: {shown}", flush=True)
    if not os.path.exists(os.path.join(ROOT, argv[0])):
      sections.append(f"## {name}\n\n{what}. Not run: `{argv[0]}` does not exist.\n")
      continue
    t0 = time.time()
    try:
      p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
      out, ok = p.stdout.strip(), p.returncode == 0
      err = p.stderr.strip().splitlines()[-15:]
    except subprocess.TimeoutExpired as e:
      out, ok, err = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), False, [f"timed out after {timeout} s"]
    took = time.time() - t0
    print(out, flush=True)
    body = [f"## {name}", "", f"{what}.", "", f"Command: `{shown}` ({took:.0f} s)", "", out]
    if not ok:
      body += ["", "**Did not finish:**", "", "```", *err, "```"]
    png = _chart(name)
    if png:
      body += ["", f"![{name}]({png})"]
    sections.append("\n".join(body) + "\n")
  head = ["# Benchmark results", "",
          f"Written by `make bench` (`python bench/run_all.py`) on "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Every comparison "
          "in a table was measured in the same run, alternating the sides, reporting medians.", ""]
  m, v = common.machine(), common.versions()
  roof = common.matmul_roof_gflops()
  head += [common.table(["machine", "value"], [[k, val] for k, val in m.items()]
                        + [[k, val] for k, val in v.items()]
                        + [["XLA f32 matmul roof (GFLOP/s)", roof["gflops"]],
                           ["roof shape", roof.get("shape")]]), ""]
  return "\n".join(head + sections)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--only", default="", help="comma-separated benchmark names")
  ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
  ap.add_argument("--output", default=os.path.join(HERE, "RESULTS.md"))
  args = ap.parse_args()
  text = run([s for s in args.only.split(",") if s], args.quick)
  tmp = args.output + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, args.output)
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
