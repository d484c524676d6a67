"""Majority voting: equivalence grouping, unparseable answers, reproducible tie-breaks, consensus."""

from __future__ import annotations

import random

import pytest

from mft_ray.config import TaskConfig
from mft_ray.society.voting import Vote, group_answers, majority_vote, vote_rng
from mft_ray.tasks import make_task


def same(a: str, b: str) -> bool:
    return a == b


def test_math_equivalent_answers_vote_together() -> None:
    task = make_task(TaskConfig(name="math"))
    vote = majority_vote(["0.5", "3", "\\frac{1}{2}", "\\dfrac12", "3"], task.equivalent, random.Random(0))
    assert vote == Vote(answer="0.5", votes=3, tie=False, consensus=3 / 5, num_parsed=5)


def test_gsm_equivalent_answers_vote_together() -> None:
    task = make_task(TaskConfig(name="gsm8k"))
    vote = majority_vote(["1000", "1,000", "$1000", "999"], task.equivalent, random.Random(0))
    assert (vote.answer, vote.votes, vote.tie) == ("1000", 3, False)


def test_unparseable_answers_do_not_vote_but_count_in_consensus() -> None:
    vote = majority_vote([None, None, "7", None], same, random.Random(0))
    assert vote == Vote(answer="7", votes=1, tie=False, consensus=0.25, num_parsed=1)
    # Three unparseable answers do not outvote one parsed answer.
    assert majority_vote([None, None, None, "B"], same, random.Random(0)).answer == "B"


def test_all_none_and_empty() -> None:
    assert majority_vote([None, None, None], same, random.Random(0)) == Vote(None, 0, False, 0.0, 0)
    assert majority_vote([], same, random.Random(0)) == Vote(None, 0, False, 0.0, 0)


@pytest.mark.parametrize(
    ("answers", "expected_answer", "votes", "consensus"),
    [
        (["A", "A", "A"], "A", 3, 1.0),
        (["A", "B", "A"], "A", 2, 2 / 3),
        (["A", "B", "B", "C", None], "B", 2, 0.4),
        (["C", "C", "D", "D", "D", None, None, None], "D", 3, 3 / 8),
    ],
)
def test_consensus_hand_computed(answers: list, expected_answer: str, votes: int, consensus: float) -> None:
    vote = majority_vote(answers, same, random.Random(0))
    assert (vote.answer, vote.votes, vote.tie) == (expected_answer, votes, False)
    assert vote.consensus == pytest.approx(consensus)
    assert vote.num_parsed == sum(a is not None for a in answers)


def test_ties_recorded_reproducible_and_both_reachable() -> None:
    answers = ["2", "5", None, "5", "2"]
    vote = majority_vote(answers, same, vote_rng(0, "p1"))
    assert vote.tie and vote.votes == 2 and vote.consensus == pytest.approx(0.4) and vote.num_parsed == 4
    # Same (seed, problem) → same winner, whatever else drew from other generators in between.
    for _ in range(5):
        random.random()
        assert majority_vote(answers, same, vote_rng(0, "p1")).answer == vote.answer
    winners = {majority_vote(answers, same, vote_rng(seed, "p1")).answer for seed in range(50)}
    assert winners == {"2", "5"}
    winners_by_problem = {majority_vote(answers, same, vote_rng(0, f"p{i}")).answer for i in range(50)}
    assert winners_by_problem == {"2", "5"}


def test_no_tie_does_not_consume_randomness() -> None:
    rng = random.Random(1)
    state = rng.getstate()
    majority_vote(["1", "1", "2"], same, rng)
    assert rng.getstate() == state


def test_vote_rng_is_the_documented_generator() -> None:
    assert vote_rng(3, "x").random() == random.Random("3:x").random()
    assert vote_rng(3, "x").random() != vote_rng(4, "x").random()


def test_greedy_grouping_uses_the_representative() -> None:
    # "close" joins a group when within 1 of its representative (the group's first answer).
    def close(a: str, b: str) -> bool:
        return abs(int(a) - int(b)) <= 1

    assert group_answers(["1", "2", "3", None, "0"], close) == [["1", "2", "0"], ["3"]]
