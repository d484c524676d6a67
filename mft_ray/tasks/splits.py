"""Seeded, disjoint finetuning / evaluation splits of a task's problems.

Without ``task.eval_path`` both splits come from one pool: its indices are shuffled with
``random.Random(task.seed)``, the first ``finetune_size`` go to finetuning and the next ``eval_size`` to
evaluation. With ``task.eval_path`` the evaluation split is drawn (same way) from that file and the
finetuning split from ``task.path``, minus any problem whose question also appears in the evaluation
split. In both modes a question text occurs at most once (repeats in the source are dropped, first kept),
so the splits are disjoint by question as well as by id.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass

from mft_ray.config import TaskConfig
from mft_ray.errors import ConfigError, DataError
from mft_ray.tasks.base import Problem, Task

logger = logging.getLogger(__name__)


@dataclass
class Splits:
    """Problems for building finetuning data (labels unused) and for evaluation; disjoint."""

    finetune: list[Problem]
    eval: list[Problem]


def question_key(problem: Problem) -> str:
    """The question with whitespace collapsed: two problems with the same key are the same problem."""
    return " ".join(problem.question.split())


def _unique_questions(pool: list[Problem], source: str) -> list[Problem]:
    seen: set[str] = set()
    kept: list[Problem] = []
    for problem in pool:
        key = question_key(problem)
        if key not in seen:
            seen.add(key)
            kept.append(problem)
    if len(kept) < len(pool):
        logger.info("%s: dropped %d repeated questions", source, len(pool) - len(kept))
    return kept


def _load_pool(task: Task) -> list[Problem]:
    source = task.source_description()
    pool = _unique_questions(task.load(), source)
    if not pool:
        raise DataError(f"{source} holds no problems")
    return pool


def _shuffled(pool: list[Problem], seed: int) -> list[Problem]:
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    return [pool[i] for i in order]


def make_splits(task: Task, cfg: TaskConfig) -> Splits:
    """Draw the finetuning and evaluation splits of ``task`` as ``cfg`` says (sizes, seed, eval_path).

    Deterministic: the same config gives the same splits, in the same order. Raises ConfigError naming
    the setting when the data holds fewer problems than asked for, and DataError for an empty pool.
    """
    if cfg.eval_path is None:
        return _split_one_pool(task, cfg)
    if not task.uses_path:
        raise ConfigError(f"task.eval_path is not used by the generated task {task.name!r}; leave it unset")
    eval_task = type(task)(dataclasses.replace(cfg, path=cfg.eval_path, eval_path=None))
    return _split_two_pools(task, eval_task, cfg)


def _split_one_pool(task: Task, cfg: TaskConfig) -> Splits:
    pool = _load_pool(task)
    wanted = cfg.finetune_size + cfg.eval_size
    if wanted > len(pool):
        raise ConfigError(
            f"task.finetune_size + task.eval_size = {cfg.finetune_size} + {cfg.eval_size} = {wanted} but "
            f"{task.source_description()} has only {len(pool)} distinct problems"
        )
    shuffled = _shuffled(pool, cfg.seed)
    return Splits(
        finetune=shuffled[: cfg.finetune_size],
        eval=shuffled[cfg.finetune_size : wanted],
    )


def _split_two_pools(task: Task, eval_task: Task, cfg: TaskConfig) -> Splits:
    eval_pool = _load_pool(eval_task)
    if cfg.eval_size > len(eval_pool):
        raise ConfigError(
            f"task.eval_size = {cfg.eval_size} but task.eval_path {eval_task.source_description()} has only "
            f"{len(eval_pool)} distinct problems"
        )
    eval_split = _shuffled(eval_pool, cfg.seed)[: cfg.eval_size]

    eval_questions = {question_key(p) for p in eval_split}
    pool = _load_pool(task)
    candidates = [p for p in pool if question_key(p) not in eval_questions]
    overlap = len(pool) - len(candidates)
    if overlap:
        logger.info("dropped %d finetuning problems whose question is in the evaluation split", overlap)
    if cfg.finetune_size > len(candidates):
        raise ConfigError(
            f"task.finetune_size = {cfg.finetune_size} but {task.source_description()} has only "
            f"{len(candidates)} distinct problems not in the evaluation split ({overlap} overlapping dropped)"
        )
    finetune_split = _shuffled(candidates, cfg.seed)[: cfg.finetune_size]
    return Splits(finetune=finetune_split, eval=eval_split)
