r"""MATH (Hendrycks et al. 2021): competition problems graded by the ``math-verify`` package.

Answers are the content of the last ``\boxed{}``. Equivalence is decided by math-verify (symbolic and
numeric comparison through SymPy), not by a hand-written string normaliser.

math-verify guards its work with ``signal.alarm`` timeouts, which only work in the main thread. Ray
actors with concurrency and any thread pool call us from other threads, so there the timeouts are
switched off; to keep a hostile answer such as ``10^{10^{10^{10}}}`` from hanging the process, parsed
expressions that would evaluate to astronomically large numbers are never handed to SymPy (they fall
back to exact string comparison), in every thread alike, so the verdict does not depend on the thread.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from functools import lru_cache
from typing import Any

from mft_ray.errors import DataError
from mft_ray.tasks.answers import last_boxed, squash
from mft_ray.tasks.base import BoxedTask, Problem
from mft_ray.tasks.readers import check_type, normalize_subject, optional, read_rows, record_id, require

logger = logging.getLogger(__name__)

TIMEOUT_S = 5  # per parse / comparison, main thread only
MAX_ANSWER_CHARS = 1000  # longer "answers" are compared as strings, never parsed
MAX_DIGITS = 100_000  # a numeric power with more digits than this is not evaluated
MAX_SYMBOLIC_EXPONENT = 100  # (x+1)^{10^6} would make SymPy expand forever
MAX_FACTORIAL_ARG = 10_000

_LEVEL_RE = re.compile(r"^\s*(?:level\s*)?(\d+)\s*$", re.IGNORECASE)


def parse_level(value: Any) -> int | None:
    """``"Level 3"`` or ``3`` → 3; ``"Level ?"`` and anything else unreadable → None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        match = _LEVEL_RE.match(value)
        if match:
            return int(match.group(1))
    return None


def _timeout() -> int | None:
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _log10_abs(value: Any) -> float:
    """log10 of ``|value|`` for a SymPy number of any size (it never materialises the number)."""
    import sympy

    magnitude = sympy.Abs(value).evalf(5)
    if not magnitude.is_Number:
        raise ValueError("not a finite number")
    if magnitude == 0:
        return -math.inf
    return float(sympy.log(magnitude, 10).evalf(5))


def _too_big(expr: Any) -> bool:
    """Whether evaluating ``expr`` could take SymPy practically forever (huge powers or factorials)."""
    import sympy

    try:
        # Post-order, so an inner tower 10^{10^{10}} is caught before its outer power is looked at.
        for node in sympy.postorder_traversal(expr):
            if isinstance(node, sympy.Pow) and node.exp.is_number:
                exponent_log = _log10_abs(node.exp)
                if node.base.is_number:
                    base_log = max(_log10_abs(node.base), math.log10(2))
                    if exponent_log + math.log10(base_log) > math.log10(MAX_DIGITS):
                        return True
                elif exponent_log > math.log10(MAX_SYMBOLIC_EXPONENT):
                    return True
            elif isinstance(node, sympy.factorial) and node.args[0].is_number:
                if _log10_abs(node.args[0]) > math.log10(MAX_FACTORIAL_ARG):
                    return True
    except (ArithmeticError, TypeError, ValueError, RecursionError):
        return True
    return False


@lru_cache(maxsize=65536)
def _parse(answer: str, timeout: int | None) -> tuple[Any, ...]:
    """math-verify's parse of one answer (wrapped in ``$...$``); empty when unparseable or unsafe."""
    if len(answer) > MAX_ANSWER_CHARS:
        return ()
    from math_verify import parse

    parsed = parse(f"${answer}$", parsing_timeout=timeout)
    from sympy import Basic, MatrixBase

    if any(isinstance(item, (Basic, MatrixBase)) and _too_big(item) for item in parsed):
        return ()
    return tuple(parsed)


@lru_cache(maxsize=65536)
def _equivalent(gold: str, pred: str, timeout: int | None) -> bool:
    squashed_gold, squashed_pred = squash(gold), squash(pred)
    if squashed_gold and squashed_gold == squashed_pred:
        return True  # identical answers are equivalent; skip SymPy
    parsed_gold, parsed_pred = _parse(gold, timeout), _parse(pred, timeout)
    if not parsed_gold or not parsed_pred:
        return False  # the strings already differ, and there is nothing to compare symbolically
    from math_verify import verify

    return bool(verify(list(parsed_gold), list(parsed_pred), timeout_seconds=timeout))


def math_equivalent(gold: str, pred: str) -> bool:
    """math-verify equivalence of two answer strings, usable from any thread; ``gold`` is the reference."""
    return _equivalent(gold, pred, _timeout())


class MATHTask(BoxedTask):
    """Records ``{problem, level, subject|type, answer|solution[, unique_id]}``, filtered by level and subject."""

    name = "math"

    def source_description(self) -> str:
        cfg = self.config
        filters = []
        if cfg.levels is not None:
            filters.append(f"levels {sorted(cfg.levels)}")
        if cfg.subjects is not None:
            filters.append(f"subjects {list(cfg.subjects)}")
        return f"{cfg.path} (after level/subject filters: {', '.join(filters)})" if filters else str(cfg.path)

    def _load(self) -> list[Problem]:
        path = self._require_path()
        levels = set(self.config.levels) if self.config.levels is not None else None
        subjects = {normalize_subject(s) for s in self.config.subjects} if self.config.subjects is not None else None
        problems: list[Problem] = []
        for lineno, record in read_rows(path):
            question = require(record, "problem", path, lineno)
            level = parse_level(record.get("level"))
            subject = optional(record, "subject", path, lineno) or optional(record, "type", path, lineno)
            answer = self._reference(record, path, lineno)
            if levels is not None and level not in levels:
                continue  # also drops "Level ?" records, whose level is unknown
            if subjects is not None and (subject is None or normalize_subject(subject) not in subjects):
                continue
            problems.append(
                Problem(
                    id=record_id(record, "unique_id", "math", path, lineno),
                    question=question,
                    answer=answer,
                    meta={"line": lineno, "level": level, "subject": subject, "solution": record.get("solution")},
                )
            )
        return problems

    @staticmethod
    def _reference(record: dict[str, Any], path: str, lineno: int) -> str:
        if record.get("answer") is not None:
            # Some exports store numeric answers as numbers; the grader works on strings.
            return str(check_type(record["answer"], "answer", path, lineno, (str, int, float))).strip()
        solution = record.get("solution")
        if solution is None:
            raise DataError(f"{path}:{lineno}: missing field 'answer' (and no 'solution' to derive it from)")
        check_type(solution, "solution", path, lineno, str)
        boxed = last_boxed(solution)
        if boxed is None:
            raise DataError(f"{path}:{lineno}: no field 'answer' and no \\boxed{{}} answer in field 'solution'")
        return boxed.strip()

    def equivalent(self, a: str, b: str) -> bool:
        return math_equivalent(a, b)
