"""Command line text generation, streamed as it is produced.

  python -m deepseek_jax.generate_text --model_dir=DIR --prompt="Hello" --max_new_tokens=64 \
      --temperature=0.7 [--top_k=50 --top_p=0.9 --seed=0 --absorb=auto --speculative]
      [--mesh=expert=-1]
  python -m deepseek_jax.generate_text --model_dir=DIR --chat --system="Be brief." \
      --prompt="What is MLA?" [--think=strip]

`--chat` renders each prompt as a user message (after the `--system` message) with the model's
chat template (`tokenizer_config.json`'s, else DeepSeek-V3's) and a generation prompt;
`--think=strip` hides an R1-style `<think>...</think>` block and shows the answer alone.

`--mesh` (axis sizes as in `python -m deepseek_jax.sharding.plan`, e.g. `fsdp=2,expert=-1`)
loads every parameter straight into its shards over the local devices and generates on that mesh.
`--model_dir` is anything `from_pretrained` reads: a released-layout safetensors directory, an
Orbax checkpoint of ours, or a trainer workdir. Text is tokenized with the tokenizer the directory
carries (its tokenizer.json, or the byte tokenizer's marker a trainer workdir holds), or with
`--tokenizer`; a model with a real vocabulary and no tokenizer is refused, not decoded as bytes.
The decode loop runs in chunks of `--chunk` steps (one compiled program, reused); the text is
printed after each chunk. Prefill and decode tokens/s are printed
at the end (after a warm-up that compiles both programs, unless --nowarmup).
(The module is not named `generate`: that is the function `deepseek_jax.generate`.)
"""

from __future__ import annotations

import contextlib
import sys
import time

import jax
from absl import app, flags

from deepseek_jax import chat, cli, generation, sharding
from deepseek_jax.config import ROUTER_DTYPES
from deepseek_jax.dtypes import BY_NAME
from deepseek_jax.pretrained import from_pretrained
from deepseek_jax.tokenizer import load_tokenizer, tokenizer_for_model

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Safetensors directory, Orbax checkpoint or "
                                  "trainer workdir.")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text; repeat the flag for a batch.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.",
                                lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 is greedy (argmax).", lower_bound=0.0)
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens.",
                              lower_bound=1)
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling probability mass, in (0, 1].",
                            upper_bound=1.0)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_ABSORB = flags.DEFINE_enum("absorb", "auto", ["auto", "true", "false"],
                            "MLA path: auto (absorbed decode, prefill by length) or forced.")
_SPECULATIVE = flags.DEFINE_bool("speculative", False,
                                 "Greedy self-speculative decoding with the MTP head.")
_CHUNK = flags.DEFINE_integer("chunk", 16, "Decode loop steps per streamed call.",
                              lower_bound=1)
_MAX_LEN = flags.DEFINE_integer("max_len", None, "Cache length (default: bucketed prompt + new).",
                                lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(BY_NAME), "Compute and storage dtype.")
_BOS = flags.DEFINE_bool("bos", True, "Prepend the tokenizer's bos token when it has one.")
_MESH = flags.DEFINE_string("mesh", None, "Shard over the devices: axis sizes such as "
                            "'fsdp=2,expert=-1' (data, fsdp, expert, tensor; -1: the rest).")
_WARMUP = flags.DEFINE_bool("warmup", True, "Compile before timing (one prefill and one step).")
_CHAT = flags.DEFINE_bool("chat", False, "Each --prompt is a user message under the model's chat "
                          "template.")
_SYSTEM = flags.DEFINE_string("system", None, "System message for --chat.")
_THINK = flags.DEFINE_enum("think", "show", ["show", "strip"],
                           "R1-style <think>...</think>: show it, or strip it (answer only).")
_ROUTER_DTYPE = flags.DEFINE_enum("router_dtype", None, list(ROUTER_DTYPES),
                                  "Router precision (default: the config's, float32); bfloat16 is "
                                  "DeepSeek's own inference code's router and expert sum.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "'byte', a tokenizer.json or a directory "
                                 "holding one (default: the one --model_dir carries).")


def _settle(text: str) -> str:
  """Text safe to print now: a trailing replacement char may be a cut multi-byte character."""
  return text.rstrip("\ufffd")


def chat_prompts(template: chat.ChatTemplate, prompts: list[str], system: str | None
                 ) -> list[list[int]]:
  """Token ids of each prompt as a user message (after `system`) with a generation prompt."""
  head = [{"role": "system", "content": system}] if system else []
  return [template.prompt(head + [{"role": "user", "content": p}]) for p in prompts]


def _shown(text: str, strip_think: bool, final: bool) -> str:
  """What to show of a completion so far: with `strip_think`, nothing until `</think>` (then the
  answer after it), and at the end all of it if there was no reasoning block."""
  if not strip_think or "</think>" in text:
    return chat.strip_thinking(text) if strip_think else text
  return text if final else ""


def run(model, tokenizer, prompts: list[str], *, max_new_tokens: int, chunk: int = 16,
        warmup: bool = True, bos: bool = True, out=sys.stdout, template=None,
        system: str | None = None, strip_think: bool = False, **gen_kw) -> list[str]:
  """Generates for each prompt, streaming the first one to `out`; returns the completions (as
  shown: reasoning stripped with `strip_think`). With a chat `template` the prompts are user
  messages (after `system`) and no bos is added (the template writes it)."""
  if template is not None:
    ids = chat_prompts(template, prompts, system)
  else:
    ids = [tokenizer.encode(p) for p in prompts]
    if bos and tokenizer.bos_id is not None:
      ids = [[tokenizer.bos_id] + i for i in ids]
  gen_kw.setdefault("eos_id", -1 if tokenizer.eos_id is None else tokenizer.eos_id)
  if warmup:
    w = generation.Generation(model, ids, max_new_tokens, **gen_kw)
    w.prefill()
    w.decode(1)
  g = generation.Generation(model, ids, max_new_tokens, **gen_kw)
  t0 = time.perf_counter()
  g.prefill()
  t1 = time.perf_counter()
  shown = ""
  out.write(prompts[0] + ("\n" if template is not None else ""))
  while True:
    text = _shown(_settle(tokenizer.decode(g.results()[0])), strip_think, final=False)
    if text.startswith(shown) and len(text) > len(shown):
      out.write(text[len(shown):])
      out.flush()
      shown = text
    if g.finished:
      break
    g.decode(chunk)
  t2 = time.perf_counter()
  texts = [_shown(tokenizer.decode(r), strip_think, final=True) for r in g.results()]
  if texts[0] != shown:
    out.write(texts[0][len(shown):] if texts[0].startswith(shown) else "\n" + texts[0])
  out.write("\n")
  for p, t in zip(prompts[1:], texts[1:]):
    out.write(f"---\n{p}{t}\n")
  n_prompt = int(g.lengths.sum())
  n_new = sum(len(r) for r in g.results())
  decoded = n_new - len(prompts)  # the first token of each comes from the prefill
  out.write(f"--- prefill: {n_prompt} tokens in {t1 - t0:.3f} s ({n_prompt / (t1 - t0):.1f} tok/s); "
            f"decode: {decoded} tokens in {t2 - t1:.3f} s "
            f"({decoded / max(t2 - t1, 1e-9):.1f} tok/s)")
  if gen_kw.get("speculative"):
    out.write(f"; draft acceptance {g.acceptance():.2f}")
  out.write("\n")
  return texts


def main(argv):
  del argv
  if not _MODEL_DIR.value:
    raise app.UsageError("--model_dir is required")
  if not _PROMPT.value:
    raise app.UsageError("--prompt is required")
  dtype = BY_NAME[_DTYPE.value]
  mesh = None
  if _MESH.value:
    try:
      mesh = sharding.make_mesh(**sharding.parse_mesh(_MESH.value))
    except ValueError as e:
      raise app.UsageError(f"--mesh={_MESH.value}: {e}") from e
  runtime = {"router_dtype": _ROUTER_DTYPE.value} if _ROUTER_DTYPE.value else {}
  model = from_pretrained(_MODEL_DIR.value, dtype=dtype, mesh=mesh, **runtime)
  tokenizer = (load_tokenizer(_TOKENIZER.value) if _TOKENIZER.value
               else tokenizer_for_model(_MODEL_DIR.value, model.cfg.vocab_size))
  template = (chat.ChatTemplate(chat.read_template(_MODEL_DIR.value), tokenizer)
              if _CHAT.value else None)
  absorb = {"auto": None, "true": True, "false": False}[_ABSORB.value]
  with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
    run(model, tokenizer, _PROMPT.value, max_new_tokens=_MAX_NEW.value, chunk=_CHUNK.value,
        warmup=_WARMUP.value, bos=_BOS.value, template=template, system=_SYSTEM.value,
        strip_think=_THINK.value == "strip", temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
        top_p=_TOP_P.value, seed=_SEED.value, absorb=absorb, speculative=_SPECULATIVE.value,
        max_len=_MAX_LEN.value)


if __name__ == "__main__":
  cli.run(main)
