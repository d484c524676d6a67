"""The arithmetic task of Du et al. (2023): evaluate ``a+b*c+d-e*f`` for random small integers.

The expression's form is a setting (``task.form``), so that a small model can be given a task it solves
30-70% of the time: ``a*b``, ``a+b``, ``a+b*c``, ... Letters are operands drawn from ``[0, task.max_int]``,
each used once; the operators are ``+``, ``-`` and ``*`` with the usual precedence. Values are computed
with integer arithmetic from the parsed form, never by evaluating text.
"""

from __future__ import annotations

import logging
import random

from mft_ray.config import ARITHMETIC_FORM
from mft_ray.errors import ConfigError
from mft_ray.tasks.base import NumericTask, Problem

logger = logging.getLogger(__name__)

DEFAULT_FORM = ARITHMETIC_FORM  # Du et al. (2023); problem ids of this form carry no form tag


def parse_form(form: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(operand letters, operators between them) of an expression form (checked by ``TaskConfig``)."""
    return tuple(form[0::2]), tuple(form[1::2])


def form_value(form: str, operands: tuple[int, ...]) -> int:
    """The value of ``form`` with ``operands`` in letter order: products first, then left-to-right sums."""
    _, ops = parse_form(form)
    terms, sign, product = 0, 1, operands[0]
    for op, x in zip(ops, operands[1:]):
        if op == "*":
            product *= x
        else:
            terms += sign * product
            sign, product = (1 if op == "+" else -1), x
    return terms + sign * product


def form_question(form: str, operands: tuple[int, ...]) -> str:
    """The question text of one problem of ``form`` (the testbed trains on exactly this wording)."""
    _, ops = parse_form(form)
    expression = str(operands[0]) + "".join(f"{op}{x}" for op, x in zip(ops, operands[1:]))
    return f"What is the result of {expression}?"


def arithmetic_value(a: int, b: int, c: int, d: int, e: int, f: int) -> int:
    """``a+b*c+d-e*f`` computed with integer arithmetic (never by evaluating text)."""
    return form_value(DEFAULT_FORM, (a, b, c, d, e, f))


def arithmetic_question(a: int, b: int, c: int, d: int, e: int, f: int) -> str:
    """The question text of one problem of the default form (the testbed trains on exactly this wording)."""
    return form_question(DEFAULT_FORM, (a, b, c, d, e, f))


class ArithmeticTask(NumericTask):
    """Generated problems of ``task.form``, operands drawn uniformly from ``[0, task.max_int]`` by
    ``Random(task.seed)``.

    ``load()`` returns exactly ``finetune_size + eval_size`` problems with distinct operand tuples, so
    the splits drawn from it are disjoint by construction. The same seed always gives the same problems.
    """

    name = "arithmetic"
    uses_path = False

    def source_description(self) -> str:
        return (f"the generated arithmetic task {self.config.form!r} (seed {self.config.seed}, "
                f"max_int {self.config.max_int})")

    def _load(self) -> list[Problem]:
        cfg = self.config
        letters, _ = parse_form(cfg.form)
        wanted = cfg.finetune_size + cfg.eval_size
        possible = (cfg.max_int + 1) ** len(letters)
        if wanted > possible:
            raise ConfigError(
                f"task.finetune_size + task.eval_size = {wanted} but task.form = {cfg.form!r} with task.max_int = "
                f"{cfg.max_int} allows only {possible} distinct arithmetic problems"
            )
        # Another form gives other problems: its ids say so, so no run directory mixes the two.
        prefix = "arithmetic" if cfg.form == DEFAULT_FORM else f"arithmetic[{cfg.form}]"
        rng = random.Random(cfg.seed)
        seen: set[tuple[int, ...]] = set()
        problems: list[Problem] = []
        while len(problems) < wanted:
            operands = tuple(rng.randint(0, cfg.max_int) for _ in letters)
            if operands in seen:
                continue  # rejection keeps the draw uniform over the problems not yet chosen
            seen.add(operands)
            problems.append(
                Problem(
                    id=f"{prefix}-{cfg.seed}-{len(problems)}",
                    question=form_question(cfg.form, operands),
                    answer=str(form_value(cfg.form, operands)),
                    meta={"operands": operands},
                )
            )
        return problems
