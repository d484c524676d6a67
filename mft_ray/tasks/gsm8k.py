"""GSM8K (Cobbe et al. 2021): grade-school word problems with a numeric answer after ``####``."""

from __future__ import annotations

import logging

from mft_ray.errors import DataError
from mft_ray.tasks.base import NumericTask, Problem
from mft_ray.tasks.readers import read_rows, record_id, require

logger = logging.getLogger(__name__)

ANSWER_MARK = "####"


def reference_answer(solution: str) -> str | None:
    """The final answer of a GSM8K reference solution: the text after the last ``####``, no commas."""
    if ANSWER_MARK not in solution:
        return None
    return solution.rsplit(ANSWER_MARK, 1)[1].strip().replace(",", "")


class GSM8KTask(NumericTask):
    r"""Records ``{question, answer[, id]}``; the model answers in ``\boxed{}``, compared numerically."""

    name = "gsm8k"

    def _load(self) -> list[Problem]:
        path = self._require_path()
        problems: list[Problem] = []
        for lineno, record in read_rows(path):
            question = require(record, "question", path, lineno)
            solution = require(record, "answer", path, lineno)
            answer = reference_answer(solution)
            if answer is None:
                raise DataError(f"{path}:{lineno}: field 'answer' has no '{ANSWER_MARK}' before the final answer")
            if not answer:
                raise DataError(f"{path}:{lineno}: field 'answer' has nothing after '{ANSWER_MARK}'")
            problems.append(
                Problem(
                    id=record_id(record, "id", "gsm8k", path, lineno),
                    question=question,
                    answer=answer,
                    meta={"line": lineno, "solution": solution.rsplit(ANSWER_MARK, 1)[0].rstrip()},
                )
            )
        return problems
