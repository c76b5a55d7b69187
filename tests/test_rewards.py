"""Rule-based rewards: answer extraction and numeric comparison, the format rule, weighted
combination, and the code reward's sandbox against bad completions (stopped or refused, scored 0,
the batch scored on)."""

import os
import socket
import time

import pytest

from deepseek_jax import rewards, sandbox


@pytest.mark.parametrize("completion, answer, want", [
    ("so the sum is \\boxed{85}.", "85", 1.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("first \\boxed{3} then \\boxed{\\frac{1}{2}}", "0.5", 1.0),  # the last box counts
    ("\\boxed{\\frac{3}{4}}", "3/4", 1.0),
    ("\\boxed{2.50}", "2.5", 1.0),
    ("#### 42\nthat is all", "42", 1.0),
    ("#### $1,234.", "1234", 1.0),
    ("#### 43", "42", 0.0),
    ("\\boxed{x+1}", "x + 1", 0.0),   # not numbers: compared as text (spaces matter inside)
    ("\\boxed{x + 1}", "x  + 1", 1.0),
    ("the answer is 42", "42", 0.0),  # no \\boxed{} and no ####: no answer
    ("\\boxed{42", "42", 0.0),        # unbalanced
    ("#### 1e400", "1", 0.0),         # not finite
])
def test_math_reward(completion, answer, want):
  assert rewards.math_reward(["q"], [completion], answer=[answer]) == [want]


@pytest.mark.parametrize("prompt, completion, want", [
    ("q", "<think>add 4 and 5</think> #### 9", 1.0),
    ("q", "  <think>\nok\n</think>\n\nAnswer: 9", 1.0),
    ("q", "<think>ok</think>", 0.0),                     # no answer after the block
    ("q", "#### 9", 0.0),                                 # no block
    ("q", "<think>a</think> b <think>c</think> d", 0.0),  # two blocks
    ("q", "<think>a <think> b</think> c", 0.0),           # nested opening
    ("q<｜Assistant｜><think>\n", "reasoning</think> 9", 1.0),  # the template opened the block
])
def test_format_reward(prompt, completion, want):
  assert rewards.format_reward([prompt], [completion]) == [want]


def test_weighted_combination_and_errors():
  fns, weights = rewards.resolve(["math", "format"], [1.0, 0.25])
  total, parts = rewards.score(fns, weights, ["q", "q"],
                               ["<think>x</think> #### 3", "#### 4"], {"answer": ["3", "3"]})
  assert parts == {"math": [1.0, 0.0], "format": [1.0, 0.0]} and total == [1.25, 0.0]
  combined = rewards.combine(fns, weights)
  assert combined(["q"], ["#### 3"], answer=["3"]) == [1.0]
  with pytest.raises(ValueError, match="unknown"):
    rewards.resolve(["maths"])
  with pytest.raises(ValueError, match="reward_weights"):
    rewards.resolve(["math", "format"], [1.0])
  with pytest.raises(ValueError, match="'short'"):
    rewards.score({"short": lambda p, c, **_: [1.0]}, {"short": 1.0}, ["a", "b"], ["x", "y"], {})


GOOD = "```python\ndef add(a, b):\n  return a + b\n```"
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
LIMITS = sandbox.Limits(timeout_s=3.0, cpu_s=3)


def test_code_reward_scores_correct_and_wrong_code():
  wrong = "```python\ndef add(a, b):\n  return a - b\n```"
  early_exit = "import os\nos._exit(0)\n"  # skips the tests: must not pass
  got = rewards.code_reward(["q"] * 4, [GOOD, wrong, early_exit, "<think>x</think>" + GOOD],
                            tests=[TESTS, TESTS, TESTS, [TESTS]], limits=LIMITS)
  assert got == [1.0, 0.0, 0.0, 1.0]


def test_sandbox_stops_or_refuses_bad_completions(tmp_path):
  """An infinite loop, a fork bomb, a connection attempt to a port this test listens on
  (127.0.0.1: nothing leaves the machine) and a write outside the temporary directory are each
  stopped or refused and score 0, while the good completion in the same batch scores 1."""
  server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  server.bind(("127.0.0.1", 0))
  server.listen(4)
  server.settimeout(0.5)
  port = server.getsockname()[1]
  outside = tmp_path / "written_by_the_sandbox.txt"
  fork_bomb = (  # bypasses the audit hook on purpose: the process cap must stop it
      "import _posixsubprocess, os, sys\n"
      "r, w = os.pipe()\n"
      "while True:\n"
      "  _posixsubprocess.fork_exec([sys.executable, '-c', 'import time; time.sleep(60)'],\n"
      "      [sys.executable.encode()], True, (), None, None, -1, -1, -1, -1, -1, -1, r, w,\n"
      "      False, False, -1, None, None, None, -1, None, False)\n")
  bad = {
      "loop": "while True:\n  pass\n",
      "fork": "import os\nwhile True:\n  os.fork()\n",
      "fork_bomb": fork_bomb,
      "connect": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n",
      "write": f"open({str(outside)!r}, 'w').write('x')\n",
  }
  completions = [f"```python\n{c}```" for c in bad.values()] + [GOOD]
  t0 = time.perf_counter()
  got = rewards.code_reward(["q"] * len(completions), completions,
                            tests=[TESTS] * len(completions), limits=LIMITS)
  assert got == [0.0] * len(bad) + [1.0]
  assert time.perf_counter() - t0 < 60
  with pytest.raises(socket.timeout):
    server.accept()  # no connection ever arrived
  server.close()
  assert not outside.exists()
  for name, code in bad.items():
    r = sandbox.run_python(code, limits=LIMITS)
    assert not r.passed, name
    if name == "loop":
      assert r.timed_out
    if name == "fork_bomb":  # the cap stops it; with none (root, no cgroup) the timeout does
      capped = "Resource temporarily unavailable" in r.stderr
      assert capped if r.processes != "none" else (capped or r.timed_out), r.stderr[-500:]
    if name in ("fork", "connect", "write"):
      assert "sandbox:" in r.stderr and "refused" in r.stderr, r.stderr[-500:]
  leftover = os.popen("pgrep -f 'import time; time.sleep(60)'").read().split()
  assert not leftover, f"sandboxed processes survived: {leftover}"


def test_sandbox_writes_inside_its_directory_and_reports_how_it_isolates():
  r = sandbox.run_python("open('note.txt', 'w').write('hi')\nprint(open('note.txt').read())\n",
                         limits=LIMITS)
  assert r.passed and r.stdout == "hi"
  assert r.network in ("netns", "userns+netns", "none")
