"""Algorithm 2 metrics on a hand-built debate whose every figure is computed by hand below."""

from __future__ import annotations

import math

import pytest

from mft_ray.config import TaskConfig
from mft_ray.metrics.accuracy import accuracy_with_stderr, evaluate_records
from mft_ray.run.records import rows_to_table
from mft_ray.tasks import Problem, make_task


@pytest.mark.parametrize(
    ("correct", "p", "se"),
    [
        ([True, True, True, False], 0.75, math.sqrt(0.75 * 0.25 / 4)),
        ([True, False], 0.5, 0.5 * 0.5 / math.sqrt(0.5 * 0.5 * 2)),  # sqrt(0.25/2)
        ([False, False, True, False, False], 0.2, math.sqrt(0.2 * 0.8 / 5)),
        ([True] * 7, 1.0, 0.0),
        ([False] * 3, 0.0, 0.0),
        ([], 0.0, 0.0),
    ],
)
def test_accuracy_with_stderr(correct: list[bool], p: float, se: float) -> None:
    got_p, got_se = accuracy_with_stderr(correct)
    assert got_p == pytest.approx(p)
    assert got_se == pytest.approx(se)


# ---------------------------------------------------------------------------------------------
# A 3-agent, 2-round debate over 4 arithmetic problems.
#
# round 1 (generators)       base (agent 0)  round-1 vote
#   p0 ref 10: 7, 10, 10.0     wrong           10 (10 and 10.0 are one group) right
#   p1 ref 20: 5, 20, 20       wrong           20 right
#   p2 ref 30: 30, 3, 3        right            3 wrong
#   p3 ref 40: -, -, 40        wrong           40 right (unparseable answers do not vote)
#   -> base 1/4, majority 3/4, agent accuracy 6/12
#
# round 2 (critics)           final majority   tie  consensus
#   p0: 10, 10, 9              10 right         no   2/3
#   p1: 20, 22, -              20.0 right       yes  1/3
#   p2: 3, 3, 30               3 wrong          no   2/3
#   p3: -, -, -                None wrong       no   0
#   -> accuracy 2/4, ties 1, no majority 1, consensus 5/12, agent accuracy 4/12
#
# Summarizer rows (answer always None) sit in round 2 and must be ignored.

REFERENCE = {"p0": "10", "p1": "20", "p2": "30", "p3": "40"}
ROUND1 = {"p0": ["7", "10", "10.0"], "p1": ["5", "20", "20"], "p2": ["30", "3", "3"], "p3": [None, None, "40"]}
ROUND2 = {"p0": ["10", "10", "9"], "p1": ["20", "22", None], "p2": ["3", "3", "30"], "p3": [None, None, None]}
FINAL = {"p0": ("10", False, 2 / 3), "p1": ("20.0", True, 1 / 3), "p2": ("3", False, 2 / 3),
         "p3": (None, False, 0.0)}


def problems() -> list[Problem]:
    return [Problem(id=pid, question=f"question {pid}", answer=ans) for pid, ans in REFERENCE.items()]


def row(pid: str, agent: int, role: str, rnd: int, answer: str | None) -> dict:
    majority, tie, consensus = FINAL[pid]
    return {
        "iteration": 0, "split": "eval", "problem_id": pid, "agent": agent, "role": role, "round": rnd,
        "messages": [{"role": "user", "content": "q"}], "response": f"\\boxed{{{answer}}}",
        "answer": answer, "majority": majority, "tie": tie, "consensus": consensus,
    }


def debate_rows(summaries: bool = True) -> list[dict]:
    rows = []
    for pid in REFERENCE:
        # Agents out of order: base accuracy must come from agent 0, not from the first row.
        for agent in (2, 0, 1):
            rows.append(row(pid, agent, "generator", 1, ROUND1[pid][agent]))
        if summaries:
            for agent in range(3):
                rows.append(row(pid, agent, "summarizer", 2, None))
        for agent in range(3):
            rows.append(row(pid, agent, "critic", 2, ROUND2[pid][agent]))
    return rows


@pytest.fixture(scope="module")
def task():
    return make_task(TaskConfig(name="arithmetic"))


def test_evaluate_records_hand_computed(task) -> None:
    m = evaluate_records(rows_to_table(debate_rows()), problems(), task, seed=0)
    assert m["problems"] == 4
    assert m["rounds"] == 2
    assert m["correct"] == 2
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["stderr"] == pytest.approx(math.sqrt(0.5 * 0.5 / 4))
    assert m["consensus"] == pytest.approx(5 / 12, abs=1e-6)  # stored as float32
    assert m["diversity"] == pytest.approx(7 / 12, abs=1e-6)
    assert m["ties"] == 1
    assert m["no_majority"] == 1
    assert m["base_accuracy"] == pytest.approx(0.25)
    assert m["base_stderr"] == pytest.approx(math.sqrt(0.25 * 0.75 / 4))
    assert m["majority_accuracy"] == pytest.approx(0.75)
    assert m["majority_stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    assert m["agent_accuracy_by_round"] == pytest.approx({"1": 6 / 12, "2": 4 / 12})
    assert list(m["agent_accuracy_by_round"]) == ["1", "2"]


def test_metrics_do_not_depend_on_row_order_or_summaries(task) -> None:
    base = evaluate_records(rows_to_table(debate_rows()), problems(), task)
    shuffled = list(reversed(debate_rows(summaries=False)))
    assert evaluate_records(rows_to_table(shuffled), problems(), task) == base


def test_unparseable_majority_counts_as_wrong(task) -> None:
    only_p3 = [r for r in debate_rows() if r["problem_id"] == "p3"]
    m = evaluate_records(rows_to_table(only_p3), [p for p in problems() if p.id == "p3"], task)
    assert (m["accuracy"], m["correct"], m["no_majority"]) == (0.0, 0, 1)
    assert m["consensus"] == 0.0
    # Round 1 still had one parsed answer, the right one: Majority is right, Base (agent 0, None) wrong.
    assert (m["majority_accuracy"], m["base_accuracy"]) == (1.0, 0.0)


def test_final_majority_graded_by_equivalence(task) -> None:
    only_p1 = [r for r in debate_rows() if r["problem_id"] == "p1"]
    m = evaluate_records(rows_to_table(only_p1), [p for p in problems() if p.id == "p1"], task)
    assert m["accuracy"] == 1.0  # "20.0" is 20
    assert m["ties"] == 1


def test_records_for_problems_outside_the_set_are_ignored(task) -> None:
    m = evaluate_records(rows_to_table(debate_rows()), problems()[:2], task)
    assert m["problems"] == 2
    assert m["accuracy"] == 1.0
    assert m["base_accuracy"] == 0.0
    assert m["majority_accuracy"] == 1.0


def test_missing_records_raise(task) -> None:
    rows = [r for r in debate_rows() if r["problem_id"] != "p2"]
    with pytest.raises(ValueError, match=r"1 evaluation problems have no debate records, e\.g\. \['p2'\]"):
        evaluate_records(rows_to_table(rows), problems(), task)


def test_problem_with_only_summaries_counts_as_missing(task) -> None:
    rows = [r for r in debate_rows() if r["problem_id"] != "p2" or r["role"] == "summarizer"]
    with pytest.raises(ValueError, match="p2"):
        evaluate_records(rows_to_table(rows), problems(), task)


def test_single_round_debate(task) -> None:
    rows = [r for r in debate_rows() if r["round"] == 1]
    for r in rows:  # in a one-round debate the final majority is the round-1 vote
        r["majority"] = {"p0": "10", "p1": "20", "p2": "3", "p3": "40"}[r["problem_id"]]
        r["tie"] = False
    m = evaluate_records(rows_to_table(rows), problems(), task)
    assert m["rounds"] == 1
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["accuracy"] == m["majority_accuracy"]
    assert m["agent_accuracy_by_round"] == pytest.approx({"1": 0.5})


def test_consensus_agrees_with_the_diversity_module(task) -> None:
    from mft_ray.metrics.diversity import consensus

    m = evaluate_records(rows_to_table(debate_rows()), problems(), task)
    assert consensus(rows_to_table(debate_rows())) == pytest.approx((m["consensus"], m["diversity"]))
