"""Distil a DeepSeek teacher into a smaller model: sampled traces, or logits on the same mesh.

  # (a) the teacher's answers to prompts, as chat data for `python -m deepseek_jax.train`
  python -m deepseek_jax.distill --teacher=DIR --prompts=prompts.jsonl --output=traces.jsonl \
      --num_samples=4 --max_new_tokens=512 --temperature=0.6 --top_p=0.95 --seed=0
  python -m deepseek_jax.train --preset=... --data=traces.jsonl --data_format=chat --workdir=W

  # (b) logit distillation: the student (--preset/--config_json/--init_from) learns the
  # teacher's next-token distributions on --data
  python -m deepseek_jax.distill --mode=logits --teacher=DIR --preset=tiny_v3 --data=corpus/ \
      --eval_data=heldout/ --kl_topk=64 --steps=1000 --workdir=W

Prompt rows are `{"prompt": str}` or `{"messages": [...]}` ending with a user message. Trace rows
are `{"messages": [..., {"role": "assistant", ...}]}` (or `{"prompt", "completion"}` with
--output_format=prompt_completion), plus `sample` and `logprob`. The logits mode's flags are
`DistillConfig`'s fields (the trainer's, plus --teacher, --kl_topk, --kl_temperature,
--ce_weight); rerunning it in the same --workdir resumes. The logic lives in
`deepseek_jax.distillation` (`write_traces`, `distill`). Bad input is one line on stderr
(`cli.run`).
"""

from __future__ import annotations

from absl import app, flags

from deepseek_jax import cli, sharding
from deepseek_jax.distillation import DistillConfig, distill, write_traces
from deepseek_jax.train_config import define_flags, flag_specs, from_flag_values

FLAGS = flags.FLAGS

_MODE = flags.DEFINE_enum("mode", "traces", ["traces", "logits"],
                          "traces: write the teacher's sampled answers; logits: train a student "
                          "on the teacher's logits.")
# Every DistillConfig field is a flag; --data and --workdir are required by the logits mode only.
define_flags(DistillConfig, required=False)
_PROMPTS = flags.DEFINE_string("prompts", None, "traces: JSONL prompt rows.")
_OUTPUT = flags.DEFINE_string("output", None, "traces: the JSONL file written.")
_FORMAT = flags.DEFINE_enum("output_format", "messages", ["messages", "prompt_completion"],
                            "traces: rows for --data_format=chat or prompt_completion.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "traces: answers per prompt.", lower_bound=1)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "traces: tokens per answer at most.",
                                lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.6, "traces: sampling temperature (0: greedy).",
                                  lower_bound=0.0)
_TOP_P = flags.DEFINE_float("top_p", 0.95, "traces: nucleus mass (1: off).", lower_bound=0.0,
                            upper_bound=1.0)
_TOP_K = flags.DEFINE_integer("top_k", None, "traces: sample among the k most likely tokens.",
                              lower_bound=1)
_SYSTEM = flags.DEFINE_string("system", None, "traces: system message for prompts without one.")
_PROMPT_BATCH = flags.DEFINE_integer("prompt_batch", 8, "traces: prompts per generate call.",
                                     lower_bound=1)
_KEEP = flags.DEFINE_bool("keep_truncated", False,
                          "traces: keep answers cut by --max_new_tokens (default: dropped).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "traces: replace an existing --output.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run(_MODE.value)


def run(mode: str) -> None:
  """The mode's function with the parsed flags."""
  dc = from_flag_values({s.name: FLAGS[s.name].value for s in flag_specs(DistillConfig)},
                        DistillConfig)
  if mode == "logits":
    for name in ("teacher", "data", "workdir"):
      if not getattr(dc, name):
        raise app.UsageError(f"--mode=logits needs --{name}")
    distill(dc)
    return
  for name, value in (("teacher", dc.teacher), ("prompts", _PROMPTS.value),
                      ("output", _OUTPUT.value)):
    if not value:
      raise app.UsageError(f"--mode=traces needs --{name}")
  mesh = sharding.make_mesh(data=dc.data_parallel, fsdp=dc.fsdp, expert=dc.expert,
                            tensor=dc.tensor)
  write_traces(dc.teacher, _PROMPTS.value, _OUTPUT.value, compute_dtype=dc.compute_dtype,
               mesh=mesh, overwrite=_OVERWRITE.value, num_samples=_NUM_SAMPLES.value,
               max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
               top_p=None if _TOP_P.value >= 1 else _TOP_P.value, top_k=_TOP_K.value,
               seed=dc.seed, prompt_batch=_PROMPT_BATCH.value, system=_SYSTEM.value,
               keep_truncated=_KEEP.value, output_format=_FORMAT.value)


if __name__ == "__main__":
  cli.run(main)
