"""The task interface, the ``Problem`` record, and helpers shared by every task.

A task knows three things: how to load its pool of problems, how to read a model's final answer out of
a response, and when two answers are the same. Everything downstream (debate, voting, dataset
construction, evaluation) goes through this interface and never looks at task-specific details.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from mft_ray.config import TaskConfig
from mft_ray.errors import DataError
from mft_ray.tasks.answers import BOXED, NONE, ParsedAnswer, last_boxed, numbers_equal, numeric_answer

logger = logging.getLogger(__name__)

MATH_INSTRUCTION = "Put your final answer in the form \\boxed{answer} at the end of your response."


@dataclass(frozen=True)
class Problem:
    """One problem of a task.

    Attributes:
        id: stable identifier, unique within the task's pool.
        question: the full text shown to the model (for MMLU it includes the lettered choices).
        answer: the ground-truth final answer as a string.
        meta: extra information (subject, level, source line, ...); ignored by ``==`` and ``hash``.
    """

    id: str
    question: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


class Task(ABC):
    """A benchmark: a pool of problems plus answer extraction and an equivalence grader.

    Subclasses set ``name`` and implement ``_load``, ``extract_answer`` and ``equivalent``. The pool is
    loaded once and cached, so ``load()`` may be called any number of times.
    """

    name: ClassVar[str]
    answer_instruction: ClassVar[str] = MATH_INSTRUCTION
    #: False for generated tasks, which read no file (``task.path`` / ``task.eval_path`` do not apply).
    uses_path: ClassVar[bool] = True

    def __init__(self, config: TaskConfig) -> None:
        self.config = config
        self._pool: list[Problem] | None = None

    def load(self) -> list[Problem]:
        """Return the whole pool of problems (after any filters), in a deterministic order."""
        if self._pool is None:
            pool = self._load()
            _check_unique_ids(pool, self.source_description())
            logger.info("%s: loaded %d problems from %s", self.name, len(pool), self.source_description())
            self._pool = pool
        # A fresh list so callers can reorder it without touching the cache; Problems are immutable.
        return list(self._pool)

    def is_correct(self, predicted: str | None, reference: str) -> bool:
        """True when ``predicted`` is equivalent to the ground truth; an unparseable answer never is."""
        if predicted is None:
            return False
        return self.equivalent(reference, predicted)

    def source_description(self) -> str:
        """Where the pool comes from, for error messages (a path plus any filters applied)."""
        return str(self.config.path)

    def _require_path(self) -> str:
        if self.config.path is None:
            raise ValueError(f"task.path is required for task {self.name!r}")
        return self.config.path

    @abstractmethod
    def _load(self) -> list[Problem]:
        """Build the pool; called once by ``load``."""

    @abstractmethod
    def parse_answer(self, text: str) -> ParsedAnswer:
        """The final answer written in a model response (None when there is none) and the rule that read it."""

    def extract_answer(self, text: str) -> str | None:
        """The final answer written in a model response, or None when there is none."""
        return self.parse_answer(text).answer

    @abstractmethod
    def equivalent(self, a: str, b: str) -> bool:
        """Whether two answers are the same. Where the grader is asymmetric, ``a`` plays the reference."""


def _check_unique_ids(pool: list[Problem], source: str) -> None:
    seen: set[str] = set()
    for problem in pool:
        if problem.id in seen:
            where = f"{source}:{problem.meta['line']}" if "line" in problem.meta else source
            raise DataError(f"{where}: duplicate problem id {problem.id!r}")
        seen.add(problem.id)


class BoxedTask(Task, ABC):
    r"""A task whose final answer is the content of the last ``\boxed{}`` of a response."""

    def parse_answer(self, text: str) -> ParsedAnswer:
        content = last_boxed(text)
        if content is None or not content.strip():
            return NONE
        return ParsedAnswer(content.strip(), BOXED)


class NumericTask(BoxedTask, ABC):
    r"""A task whose answers are numbers: the last ``\boxed{}``, else an explicit "answer is X" or a closing
    "= X", else the last number of the reply (``answers.numeric_answer``)."""

    def parse_answer(self, text: str) -> ParsedAnswer:
        return numeric_answer(text)

    def equivalent(self, a: str, b: str) -> bool:
        return numbers_equal(a, b)
