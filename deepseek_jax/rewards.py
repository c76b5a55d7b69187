"""Rule-based (verifiable) rewards for RL, as DeepSeek-R1 used them: is the answer right, is the
format right.

A reward is a function `reward(prompts, completions, **columns) -> list[float]`: one score per
completion; `columns` are the prompt rows' other fields, one list each, aligned with the
completions (e.g. `answer`, `tests`), and a reward ignores the columns it does not use. Several
combine with weights (`combine`).

Built in (`REWARDS`):
- `math`: 1.0 when the completion's final answer equals the row's `answer`, else 0.0. The final
  answer is the content of the last `\\boxed{...}` (braces balanced), else the text after the
  last `####` (up to the end of its line). Both sides are compared as numbers when both parse
  (commas, `$`, `%`, spaces and a trailing period dropped; `a/b` fractions; relative tolerance
  1e-6), else as whitespace-normalised strings.
- `format`: 1.0 when the completion is one `<think>...</think>` block followed by a non-empty
  answer, else 0.0. A prompt that already ends with `<think>` (as R1's chat template opens the
  block for the model) counts as the block's opening.
- `code`: 1.0 when the completion's code passes the row's `tests` (Python source; a list of
  sources is joined), run by `sandbox.run_python` in a separate process with time and memory
  limits, no network and no writes outside its temporary directory; else 0.0. The code is the
  last ```python fenced block of the completion (the whole completion when it has none, the text
  after `</think>` when it has a reasoning block).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Callable, Mapping, Sequence

from deepseek_jax import sandbox

Reward = Callable[..., list]

_BOXED = "\\boxed"
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


# ------------------------------------------------------------------------------------ math
def last_boxed(text: str) -> str | None:
  """The content of the last `\\boxed{...}` in `text` (nested braces kept), else None."""
  start = text.rfind(_BOXED + "{")
  if start < 0:
    return None
  i = start + len(_BOXED) + 1
  depth = 1
  for j in range(i, len(text)):
    if text[j] == "{":
      depth += 1
    elif text[j] == "}":
      depth -= 1
      if depth == 0:
        return text[i:j]
  return None  # unbalanced: no answer


def extract_answer(text: str) -> str | None:
  """The final answer of a completion: last \\boxed{} content, else what follows the last ####."""
  boxed = last_boxed(text)
  if boxed is not None:
    return boxed.strip()
  if "####" in text:
    tail = text.rsplit("####", 1)[1].strip()
    return tail.split("\n", 1)[0].strip() if tail else None
  return None


def parse_number(text: str) -> Fraction | float | None:
  """A number from an answer string (see the module docstring), else None."""
  s = text.strip().replace(",", "").replace("$", "").replace("%", "").replace(" ", "")
  s = s.rstrip(".")
  for wrapper in ("\\text{", "\\mathrm{"):
    if s.startswith(wrapper) and s.endswith("}"):
      s = s[len(wrapper):-1]
  frac = re.fullmatch(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}", s)
  if frac:
    s = f"{frac.group(1)}/{frac.group(2)}"
  if "/" in s:
    num, _, den = s.partition("/")
    a, b = parse_number(num), parse_number(den)
    if a is None or b is None or b == 0:
      return None
    return Fraction(a) / Fraction(b) if not isinstance(a, float) and not isinstance(b, float) \
        else float(a) / float(b)
  if not _NUMBER.match(s):
    return None
  if re.fullmatch(r"[-+]?\d+", s):
    return Fraction(int(s))
  value = float(s)
  return value if math.isfinite(value) else None


def answers_equal(given: str, expected: str) -> bool:
  """Numbers compared as numbers (relative tolerance 1e-6), anything else as normalised text."""
  a, b = parse_number(given), parse_number(expected)
  if a is not None and b is not None:
    if isinstance(a, Fraction) and isinstance(b, Fraction):
      return a == b
    a, b = float(a), float(b)
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
  norm = lambda s: " ".join(s.split())
  return norm(given) == norm(expected)


def math_reward(prompts: Sequence[str], completions: Sequence[str], *, answer: Sequence,
                **_) -> list[float]:
  """1.0 where the completion's final answer equals `answer` (see the module docstring)."""
  out = []
  for completion, expected in zip(completions, answer, strict=True):
    given = extract_answer(completion)
    out.append(1.0 if given is not None and answers_equal(given, str(expected)) else 0.0)
  return out


# ------------------------------------------------------------------------------------ format
_FORMAT = re.compile(r"^\s*<think>(?:(?!<think>|</think>).)*</think>\s*\S", re.DOTALL)


def format_reward(prompts: Sequence[str], completions: Sequence[str], **_) -> list[float]:
  """1.0 for one `<think>...</think>` block then an answer (see the module docstring)."""
  out = []
  for prompt, completion in zip(prompts, completions, strict=True):
    text = completion
    if prompt.rstrip().endswith("<think>") and not completion.lstrip().startswith("<think>"):
      text = "<think>" + completion
    ok = _FORMAT.match(text) is not None and text.count("</think>") == 1
    out.append(1.0 if ok else 0.0)
  return out


# ------------------------------------------------------------------------------------ code
_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str:
  """The program in a completion: its last fenced block (the text after `</think>` first)."""
  text = completion.split("</think>")[-1]
  blocks = _FENCE.findall(text)
  return blocks[-1] if blocks else text


def code_reward(prompts: Sequence[str], completions: Sequence[str], *, tests: Sequence,
                limits: sandbox.Limits = sandbox.Limits(), **_) -> list[float]:
  """1.0 where the completion's code passes `tests` in the sandbox (see the module docstring).
  Completions run one after another (a fork bomb in one cannot starve another's processes)."""
  out = []
  for completion, test in zip(completions, tests, strict=True):
    source = "\n\n".join(test) if isinstance(test, (list, tuple)) else str(test)
    program = extract_code(completion) + "\n\n# ---- tests ----\n" + source + "\n"
    out.append(1.0 if sandbox.run_python(program, limits=limits).passed else 0.0)
  return out


REWARDS: dict[str, Reward] = {"math": math_reward, "format": format_reward, "code": code_reward}
# Rewards whose score says the answer is right: their mean is logged as `accuracy`.
CORRECTNESS = ("math", "code")


# ------------------------------------------------------------------------------------ combining
def score(rewards: Mapping[str, Reward], weights: Mapping[str, float], prompts: Sequence[str],
          completions: Sequence[str], columns: Mapping[str, Sequence]
          ) -> tuple[list[float], dict[str, list[float]]]:
  """(Σ_name weight · reward, {name: reward}) for each completion; a reward that returns the
  wrong number of scores or a non-finite one raises, naming it."""
  parts: dict[str, list[float]] = {}
  for name, fn in rewards.items():
    values = [float(v) for v in fn(list(prompts), list(completions), **columns)]
    if len(values) != len(completions):
      raise ValueError(f"reward {name!r}: returned {len(values)} scores for "
                       f"{len(completions)} completions")
    if not all(math.isfinite(v) for v in values):
      raise ValueError(f"reward {name!r}: returned a non-finite score")
    parts[name] = values
  total = [sum(weights[n] * parts[n][i] for n in rewards) for i in range(len(completions))]
  return total, parts


def combine(rewards: Mapping[str, Reward], weights: Mapping[str, float] | None = None) -> Reward:
  """One reward, the weighted sum of several (weights default to 1)."""
  weights = {n: 1.0 for n in rewards} if weights is None else dict(weights)
  missing = sorted(set(rewards) - set(weights))
  if missing:
    raise ValueError(f"combine: no weight for {missing}")

  def combined(prompts, completions, **columns) -> list[float]:
    return score(rewards, weights, prompts, completions, columns)[0]

  return combined


def resolve(names: Sequence[str], weights: Sequence[float] = ()) -> tuple[dict[str, Reward],
                                                                           dict[str, float]]:
  """Built-in rewards by name (--reward) with their weights (--reward_weights; default 1 each)."""
  names = [n.strip() for n in names if n.strip()]
  if not names:
    raise ValueError(f"--reward: name at least one of {sorted(REWARDS)}")
  unknown = [n for n in names if n not in REWARDS]
  if unknown:
    raise ValueError(f"--reward={','.join(names)}: unknown {unknown}; expected names from "
                     f"{sorted(REWARDS)}")
  if len(set(names)) != len(names):
    raise ValueError(f"--reward={','.join(names)}: a reward is named twice")
  if weights and len(weights) != len(names):
    raise ValueError(f"--reward_weights: {len(weights)} weights for {len(names)} rewards "
                     f"({','.join(names)})")
  w = [float(x) for x in weights] if weights else [1.0] * len(names)
  return {n: REWARDS[n] for n in names}, dict(zip(names, w))
