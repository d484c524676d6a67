"""Splits: seeded, disjoint, sized as configured, and loud when the data is too small."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mft_ray.config import TaskConfig
from mft_ray.errors import ConfigError, DataError
from mft_ray.tasks import Splits, make_splits, make_task
from tests.conftest import SHARED_DATA as DATA

if not DATA.is_dir():
    DATA = Path("/work/shared/data")
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared benchmark data not present")


def gsm_file(path: Path, questions: list[str]) -> str:
    path.write_text("".join(json.dumps({"question": q, "answer": f"#### {i}"}) + "\n" for i, q in enumerate(questions)))
    return str(path)


def splits_of(cfg: TaskConfig) -> Splits:
    return make_splits(make_task(cfg), cfg)


def ids(problems: list) -> list[str]:
    return [p.id for p in problems]


def test_arithmetic_splits_sizes_disjoint_deterministic() -> None:
    cfg = TaskConfig(name="arithmetic", finetune_size=40, eval_size=30, seed=3)
    splits = splits_of(cfg)
    assert len(splits.finetune) == 40 and len(splits.eval) == 30
    assert not set(ids(splits.finetune)) & set(ids(splits.eval))
    assert not {p.question for p in splits.finetune} & {p.question for p in splits.eval}
    again = splits_of(cfg)
    assert ids(again.finetune) == ids(splits.finetune) and ids(again.eval) == ids(splits.eval)


def test_one_pool_seeds(tmp_path: Path) -> None:
    path = gsm_file(tmp_path / "pool.jsonl", [f"question {i}" for i in range(100)])
    base = TaskConfig(name="gsm8k", path=path, finetune_size=30, eval_size=20, seed=0)
    first, again = splits_of(base), splits_of(base)
    assert ids(first.finetune) == ids(again.finetune) and ids(first.eval) == ids(again.eval)
    other = splits_of(TaskConfig(name="gsm8k", path=path, finetune_size=30, eval_size=20, seed=1))
    assert ids(other.finetune) != ids(first.finetune)
    assert not set(ids(first.finetune)) & set(ids(first.eval))
    # The split is a shuffle of the pool: first finetune_size for finetuning, the next eval_size for eval.
    bigger = splits_of(TaskConfig(name="gsm8k", path=path, finetune_size=30, eval_size=40, seed=0))
    assert ids(bigger.finetune) == ids(first.finetune) and ids(bigger.eval)[:20] == ids(first.eval)


def test_repeated_questions_never_straddle_the_splits(tmp_path: Path) -> None:
    path = gsm_file(tmp_path / "pool.jsonl", [f"q {i % 10}" for i in range(20)])  # each question twice
    splits = splits_of(TaskConfig(name="gsm8k", path=path, finetune_size=5, eval_size=5))
    assert len({p.question for p in splits.finetune + splits.eval}) == 10
    with pytest.raises(ConfigError, match="only 10 distinct problems"):
        splits_of(TaskConfig(name="gsm8k", path=path, finetune_size=6, eval_size=5))


def test_too_large_names_the_sizes(tmp_path: Path) -> None:
    path = gsm_file(tmp_path / "small.jsonl", [f"question {i}" for i in range(50)])
    cfg = TaskConfig(name="gsm8k", path=path, finetune_size=40, eval_size=20)
    with pytest.raises(ConfigError, match=r"task\.finetune_size \+ task\.eval_size = 40 \+ 20 = 60 .*small\.jsonl has only 50"):
        splits_of(cfg)
    assert isinstance(ConfigError("x"), ValueError)


def test_empty_pool(tmp_path: Path) -> None:
    path = tmp_path / "math.jsonl"
    path.write_text(json.dumps({"problem": "p", "level": "Level 5", "answer": "1"}) + "\n")
    cfg = TaskConfig(name="math", path=str(path), finetune_size=1, eval_size=1)
    with pytest.raises(DataError, match=r"math\.jsonl \(after level/subject filters: levels \[1, 2, 3\]\) holds no problems"):
        splits_of(cfg)


def test_eval_path_mode(tmp_path: Path) -> None:
    train = gsm_file(tmp_path / "train.jsonl", [f"question {i}" for i in range(60)])
    test = gsm_file(tmp_path / "test.jsonl", [f"question {i}" for i in range(50, 90)])  # 10 shared questions
    cfg = TaskConfig(name="gsm8k", path=train, eval_path=test, finetune_size=50, eval_size=40, seed=5)
    splits = splits_of(cfg)
    assert len(splits.eval) == 40 and len(splits.finetune) == 50
    assert all(p.id.startswith("gsm8k:test:") for p in splits.eval)
    assert all(p.id.startswith("gsm8k:train:") for p in splits.finetune)
    assert not {p.question for p in splits.finetune} & {p.question for p in splits.eval}
    again = splits_of(cfg)
    assert ids(again.finetune) == ids(splits.finetune) and ids(again.eval) == ids(splits.eval)
    with pytest.raises(ConfigError, match=r"task\.finetune_size = 51 .*train\.jsonl has only 50 .*10 overlapping"):
        splits_of(TaskConfig(name="gsm8k", path=train, eval_path=test, finetune_size=51, eval_size=40))
    with pytest.raises(ConfigError, match=r"task\.eval_size = 41 .*test\.jsonl has only 40"):
        splits_of(TaskConfig(name="gsm8k", path=train, eval_path=test, finetune_size=1, eval_size=41))


def test_eval_path_rejected_for_generated_task(tmp_path: Path) -> None:
    path = gsm_file(tmp_path / "x.jsonl", ["q"])
    cfg = TaskConfig(name="arithmetic", eval_path=path, finetune_size=1, eval_size=1)
    with pytest.raises(ConfigError, match=r"task\.eval_path"):
        splits_of(cfg)


@needs_data
def test_real_math_train_test_splits() -> None:
    cfg = TaskConfig(
        name="math",
        path=str(DATA / "math" / "train.jsonl"),
        eval_path=str(DATA / "math" / "test.jsonl"),
        finetune_size=500,
        eval_size=500,
    )
    splits = splits_of(cfg)
    assert len(splits.finetune) == 500 and len(splits.eval) == 500
    assert all(p.meta["level"] in (1, 2, 3) for p in splits.finetune + splits.eval)
    assert not {" ".join(p.question.split()) for p in splits.finetune} & {" ".join(p.question.split()) for p in splits.eval}


@needs_data
def test_real_mmlu_one_pool() -> None:
    cfg = TaskConfig(name="mmlu", path=str(DATA / "mmlu" / "test.jsonl"), finetune_size=500, eval_size=500, seed=1)
    splits = splits_of(cfg)
    assert not {p.question for p in splits.finetune} & {p.question for p in splits.eval}
    assert ids(splits_of(cfg).eval) == ids(splits.eval)
