"""Algorithm 2: score a society's debate on the evaluation split against the ground truth.

Accuracy is the share of problems whose final-round majority answer is equivalent to the reference,
with standard error sqrt(p(1-p)/n). Round-1 records also give the Base (one agent, one sample) and
Majority (vote over N independent samples) figures for free.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Sequence

import pyarrow as pa

from mft_ray.society.voting import majority_vote, vote_rng
from mft_ray.tasks import Problem, Task


def accuracy_with_stderr(correct: Sequence[bool]) -> tuple[float, float]:
    """(p, sqrt(p(1-p)/n)); (0, 0) for an empty list."""
    n = len(correct)
    if n == 0:
        return 0.0, 0.0
    p = sum(correct) / n
    return p, math.sqrt(p * (1 - p) / n)


def evaluate_records(records: pa.Table, problems: Sequence[Problem], task: Task, seed: int = 0) -> dict[str, Any]:
    """Metrics of one debate over ``problems``; every problem must have records."""
    reference = {p.id: p.answer for p in problems}
    rows = records.select(["problem_id", "agent", "role", "round", "answer", "majority", "tie",
                           "consensus"]).to_pylist()
    by_problem: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["role"] != "summarizer":
            by_problem[r["problem_id"]].append(r)
    missing = [pid for pid in reference if pid not in by_problem]
    if missing:
        raise ValueError(f"{len(missing)} evaluation problems have no debate records, e.g. {missing[:3]}")

    final_round = max(r["round"] for r in rows)
    majority_correct, base_correct, round1_majority_correct = [], [], []
    per_round: dict[int, list[bool]] = defaultdict(list)
    consensus, ties, unanswered = [], 0, 0
    for pid, ref in reference.items():
        recs = by_problem[pid]
        final = next((r for r in recs if r["round"] == final_round), None)
        if final is None:
            raise ValueError(f"problem {pid} has no round-{final_round} records: the debate is incomplete")
        majority_correct.append(task.is_correct(final["majority"], ref))
        consensus.append(final["consensus"])
        ties += bool(final["tie"])
        unanswered += final["majority"] is None
        for r in recs:
            per_round[r["round"]].append(task.is_correct(r["answer"], ref))
        round1 = sorted((r for r in recs if r["round"] == 1), key=lambda r: r["agent"])
        base_correct.append(task.is_correct(round1[0]["answer"], ref))
        vote = majority_vote([r["answer"] for r in round1], task.equivalent, vote_rng(seed, pid))
        round1_majority_correct.append(task.is_correct(vote.answer, ref))

    acc, se = accuracy_with_stderr(majority_correct)
    base, base_se = accuracy_with_stderr(base_correct)
    maj, maj_se = accuracy_with_stderr(round1_majority_correct)
    return {
        "problems": len(reference),
        "rounds": final_round,
        "accuracy": acc,
        "stderr": se,
        "correct": sum(majority_correct),
        "consensus": sum(consensus) / len(consensus),
        "diversity": 1 - sum(consensus) / len(consensus),
        "ties": ties,
        "no_majority": unanswered,
        "agent_accuracy_by_round": {str(m): sum(v) / len(v) for m, v in sorted(per_round.items())},
        "base_accuracy": base,
        "base_stderr": base_se,
        "majority_accuracy": maj,
        "majority_stderr": maj_se,
    }
