"""The arithmetic task of Du et al. (2023): evaluate ``a+b*c+d-e*f`` for random small integers."""

from __future__ import annotations

import logging
import random

from mft_ray.errors import ConfigError
from mft_ray.tasks.base import NumericTask, Problem

logger = logging.getLogger(__name__)

NUM_OPERANDS = 6


def arithmetic_value(a: int, b: int, c: int, d: int, e: int, f: int) -> int:
    """``a+b*c+d-e*f`` computed with integer arithmetic (never by evaluating text)."""
    return a + b * c + d - e * f


def arithmetic_question(a: int, b: int, c: int, d: int, e: int, f: int) -> str:
    """The question text of one problem (the testbed trains on exactly this wording)."""
    return f"What is the result of {a}+{b}*{c}+{d}-{e}*{f}?"


class ArithmeticTask(NumericTask):
    """Generated problems, operands drawn uniformly from ``[0, task.max_int]`` by ``Random(task.seed)``.

    ``load()`` returns exactly ``finetune_size + eval_size`` problems with distinct operand tuples, so
    the splits drawn from it are disjoint by construction. The same seed always gives the same problems.
    """

    name = "arithmetic"
    uses_path = False

    def source_description(self) -> str:
        return f"the generated arithmetic task (seed {self.config.seed}, max_int {self.config.max_int})"

    def _load(self) -> list[Problem]:
        cfg = self.config
        wanted = cfg.finetune_size + cfg.eval_size
        possible = (cfg.max_int + 1) ** NUM_OPERANDS
        if wanted > possible:
            raise ConfigError(
                f"task.finetune_size + task.eval_size = {wanted} but task.max_int = {cfg.max_int} allows only "
                f"{possible} distinct arithmetic problems"
            )
        rng = random.Random(cfg.seed)
        seen: set[tuple[int, ...]] = set()
        problems: list[Problem] = []
        while len(problems) < wanted:
            operands = tuple(rng.randint(0, cfg.max_int) for _ in range(NUM_OPERANDS))
            if operands in seen:
                continue  # rejection keeps the draw uniform over the problems not yet chosen
            seen.add(operands)
            a, b, c, d, e, f = operands
            problems.append(
                Problem(
                    id=f"arithmetic-{cfg.seed}-{len(problems)}",
                    question=arithmetic_question(*operands),
                    answer=str(arithmetic_value(a, b, c, d, e, f)),
                    meta={"operands": operands},
                )
            )
        return problems
