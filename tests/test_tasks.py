"""Synthetic verifiable tasks: distinct problems, right answers, held-out sets disjoint from the
training set, the math reward reading the warm-up's reply format."""

import json

import pytest

from deepseek_jax import rewards, tasks


@pytest.mark.parametrize("make, kw", [(tasks.addition_rows, dict(digits=2)),
                                      (tasks.addition_rows, dict(digits=2, digits_b=1)),
                                      (tasks.sort_rows, dict(length=4))])
def test_rows_are_distinct_right_and_disjoint_from_the_excluded(make, kw):
  train = make(300, seed=0, **kw)
  held = make(50, seed=1, exclude=[r["prompt"] for r in train], **kw)
  prompts = [r["prompt"] for r in train + held]
  assert len(set(prompts)) == len(prompts) == 350
  for r in train + held:
    if r["prompt"].startswith("sort "):
      digits = r["prompt"].split()[1:]
      assert len(digits) == kw["length"] and r["answer"] == "".join(sorted(digits))
    else:
      a, b = r["prompt"].rstrip("=").split("+")
      assert int(r["answer"]) == int(a) + int(b)
      assert int(a) < 10 ** kw["digits"] and int(b) < 10 ** kw.get("digits_b", kw["digits"])
  convs = tasks.sft_rows(held)
  replies = [c["messages"][1]["content"] for c in convs]
  assert rewards.math_reward([r["prompt"] for r in held], replies,
                             answer=[r["answer"] for r in held]) == [1.0] * len(held)


def test_too_many_problems_and_atomic_files(tmp_path):
  with pytest.raises(ValueError, match="only 10 distinct lists"):
    tasks.sort_rows(11, length=1)
  rows = tasks.addition_rows(95, digits=1)
  with pytest.raises(ValueError, match="only 5 distinct problems left"):
    tasks.addition_rows(6, digits=1, exclude=[r["prompt"] for r in rows])
  path = tasks.write_jsonl(tmp_path / "d" / "rows.jsonl", rows[:3])
  assert [json.loads(l) for l in open(path)] == rows[:3]
  assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["rows.jsonl"]
