"""MMLU (Hendrycks et al. 2021): four-way multiple choice; the answer is a letter A-D."""

from __future__ import annotations

import logging
import re
from typing import Any

from mft_ray.errors import DataError
from mft_ray.tasks.answers import ANSWER_IS, BOXED, NONE, OPTION_LETTER, PAREN_LETTER, ParsedAnswer, last_boxed
from mft_ray.tasks.base import Problem, Task
from mft_ray.tasks.readers import normalize_subject, optional, read_rows, record_id, require

logger = logging.getLogger(__name__)

LETTERS = "ABCD"
_WRAPPER_RE = re.compile(r"^\\(?:text|textbf|mathrm|mathbf|mbox)\{(.*)\}$", re.DOTALL)
_PAREN_LETTER_RE = re.compile(r"\(([A-Da-d])\)")
# "C) takes the pill" or "b. Paris" opening a line: the option a reply names by its label
_OPTION_RE = re.compile(r"^\s*\(?([A-Da-d])[).:]\s", re.MULTILINE)
# "the answer is (c)", "Answer: C", "answer: (b)." (the last such statement wins)
_ANSWER_LETTER_RE = re.compile(r"answer\s*(?:is|:)\s*:?\s*\**\s*\(?([A-Da-d])\b\)?", re.IGNORECASE)


def boxed_letter(content: str) -> str | None:
    r"""The letter named by a box's content: ``B``, ``(B)``, ``\text{B}``, ``B) text`` → ``B``."""
    s = content.strip()
    while True:
        match = _WRAPPER_RE.match(s)
        if not match:
            break
        s = match.group(1).strip()
    s = s.lstrip("(").lstrip()
    if not s or s[0].upper() not in LETTERS:
        return None
    # "B) Paris" names B, but "All of the above" or "Dog" does not name A or D.
    if len(s) > 1 and s[1].isalpha():
        return None
    return s[0].upper()


def answer_letter(value: Any, path: str, lineno: int) -> str:
    """A record's answer as a letter: ``"B"`` stays, an index ``1`` becomes ``"B"``."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(LETTERS):
        return LETTERS[value]
    if isinstance(value, str) and value.strip().upper() in LETTERS and value.strip():
        return value.strip().upper()
    raise DataError(f"{path}:{lineno}: field 'answer' must be a letter A-D or an index 0-3, got {value!r}")


def format_question(question: str, choices: list[str]) -> str:
    """The question followed by one ``A) choice`` line per choice."""
    # The source keeps stray leading/trailing whitespace verbatim; it only adds noise to a prompt.
    lines = [question.strip()] + [f"{letter}) {choice.strip()}" for letter, choice in zip(LETTERS, choices)]
    return "\n".join(lines)


class MMLUTask(Task):
    """Records ``{question, choices[4], answer[, subject, id]}``, optionally filtered by subject."""

    name = "mmlu"
    answer_instruction = (
        "Put your final answer in the form \\boxed{X}, where X is one of A, B, C or D, at the end of your response."
    )

    def source_description(self) -> str:
        if self.config.subjects is None:
            return str(self.config.path)
        return f"{self.config.path} (after subject filter: subjects {list(self.config.subjects)})"

    def _load(self) -> list[Problem]:
        path = self._require_path()
        subjects = {normalize_subject(s) for s in self.config.subjects} if self.config.subjects is not None else None
        problems: list[Problem] = []
        for lineno, record in read_rows(path):
            question = require(record, "question", path, lineno)
            choices = require(record, "choices", path, lineno, (list, tuple))
            if len(choices) != len(LETTERS) or not all(isinstance(c, str) for c in choices):
                raise DataError(f"{path}:{lineno}: field 'choices' must be a list of 4 strings")
            answer = answer_letter(require(record, "answer", path, lineno, (str, int)), path, lineno)
            subject = optional(record, "subject", path, lineno)
            if subjects is not None and (subject is None or normalize_subject(subject) not in subjects):
                continue
            problems.append(
                Problem(
                    id=record_id(record, "id", "mmlu", path, lineno),
                    question=format_question(question, list(choices)),
                    answer=answer,
                    meta={"line": lineno, "subject": subject, "choices": list(choices)},
                )
            )
        return problems

    def parse_answer(self, text: str) -> ParsedAnswer:
        r"""The letter in the last ``\boxed{}``; else the last explicit "answer is (c)" / "Answer: C"; else the
        last ``(X)``; else the one option a reply names by its label at a line start ("C) ..."); else none.
        Lower-case letters count."""
        content = last_boxed(text)
        if content is not None:
            letter = boxed_letter(content)
            if letter is not None:
                return ParsedAnswer(letter, BOXED)
        stated = _ANSWER_LETTER_RE.findall(text)
        if stated:
            return ParsedAnswer(stated[-1].upper(), ANSWER_IS)
        matches = _PAREN_LETTER_RE.findall(text)
        if matches:
            return ParsedAnswer(matches[-1].upper(), PAREN_LETTER)
        # A reply naming one option by its label ("D) neither genotype nor phenotype"); one that lists
        # several options names none of them.
        options = {m.upper() for m in _OPTION_RE.findall(text + " ")}
        return ParsedAnswer(options.pop(), OPTION_LETTER) if len(options) == 1 else NONE

    def equivalent(self, a: str, b: str) -> bool:
        return a.strip().upper() == b.strip().upper() and bool(a.strip())
