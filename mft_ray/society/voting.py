"""Majority voting over parsed answers, grouping answers the task's grader calls equivalent.

Unparseable answers (None) do not vote but do count in the consensus denominator. Ties between the
largest groups are broken by a seeded random choice and recorded, so a run can report how often the
pseudo-label was a coin flip. Use ``vote_rng(seed, problem_id)`` for the generator so that a problem's
tie-break does not depend on the order in which problems are processed.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Callable, Sequence

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Vote:
    """The outcome of a vote.

    Attributes:
        answer: the winning group's representative (its first answer), or None if nothing parsed.
        votes: the size of the winning group.
        tie: whether several groups shared the largest size (the winner was then drawn at random).
        consensus: ``votes / len(answers)``, counting unparseable answers in the denominator; 0.0 if empty.
        num_parsed: how many answers were not None.
    """

    answer: str | None
    votes: int
    tie: bool
    consensus: float
    num_parsed: int


def vote_rng(seed: int, problem_id: str) -> random.Random:
    """The tie-break generator of one problem: reproducible whatever order problems are voted in."""
    # String seeds are hashed with SHA-512 by random.Random, so this is stable across processes.
    return random.Random(f"{seed}:{problem_id}")


def group_answers(answers: Sequence[str | None], equivalent: Callable[[str, str], bool]) -> list[list[str]]:
    """Group the non-None answers greedily, in order of first appearance.

    Each answer joins the first group whose representative (that group's first answer) is equivalent to
    it, ``equivalent(representative, answer)``, or starts a new group.
    """
    groups: list[list[str]] = []
    for answer in answers:
        if answer is None:
            continue
        for group in groups:
            if equivalent(group[0], answer):
                group.append(answer)
                break
        else:
            groups.append([answer])
    return groups


def majority_vote(
    answers: Sequence[str | None],
    equivalent: Callable[[str, str], bool],
    rng: random.Random,
) -> Vote:
    """The majority answer among ``answers`` under ``equivalent``; ties broken by ``rng.choice``.

    ``rng`` is consulted only when there is a tie, over the tied groups in order of first appearance.
    """
    groups = group_answers(answers, equivalent)
    num_parsed = sum(len(g) for g in groups)
    if not groups:
        return Vote(answer=None, votes=0, tie=False, consensus=0.0, num_parsed=0)
    largest = max(len(g) for g in groups)
    tied = [g for g in groups if len(g) == largest]
    winner = rng.choice(tied) if len(tied) > 1 else tied[0]
    return Vote(
        answer=winner[0],
        votes=largest,
        tie=len(tied) > 1,
        consensus=largest / len(answers),
        num_parsed=num_parsed,
    )
