"""Where does a debate gain or lose between rounds? Reads the records of a finished debate.

    python benchmarks/debate_rounds.py --config jobs/configs/demo_cpu.yaml RUN_DIR/iter_0/debate_eval [key=value ...]

For a debate of N agents x 2 rounds (e.g. ``python -m jobs.debate --config C --split eval run_dir=R``),
against the ground truth of the config's task: round-1 accuracy and the majority of the round-1 answers
(what Majority-of-N would score on the same samples), round-2 accuracy and the debate's final majority;
how often each summary restates the other agents' round-1 answers exactly (in the order the agent was
shown them); what the critics did, by the testbed's reply formats ("The other agents agree on X" = join,
"I keep my answer" = keep, anything else = re-solve), each split by whether the agent's own round-1
answer was right and whether its round-2 answer is; which number a keep reply wrote (its own round-1
answer, a number of its summary, another agent's answer, or none of these); and the final majority had
every keep reply written its own round-1 answer. Summary and keep figures use the testbed's formats;
with other models they read as "not matched". The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from mft_ray.config import load_config
    from mft_ray.models.testbed import critic_reply_kind, summary_answers
    from mft_ray.run.records import read_records
    from mft_ray.society.voting import majority_vote, vote_rng
    from mft_ray.tasks import make_splits, make_task

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("debate_dir")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    task = make_task(cfg.task)
    splits = make_splits(task, cfg.task)
    gold = {p.id: p.answer for p in (*splits.finetune, *splits.eval)}
    by_problem: dict[str, dict] = defaultdict(dict)
    for r in read_records(args.debate_dir).to_pylist():
        by_problem[r["problem_id"]][(r["role"], r["round"], r["agent"])] = r
    n_agents = cfg.debate.agents

    def majority(answers: list, pid: str) -> str | None:  # the debate's own seeded vote (actors.coordinator)
        return majority_vote(answers, task.equivalent, vote_rng(cfg.seed, pid)).answer

    right = Counter()
    summaries = Counter()
    kinds: Counter = Counter()
    keep_wrote: Counter = Counter()
    for pid, turns in by_problem.items():
        truth = gold[pid]
        first = [turns[("generator", 1, n)]["answer"] for n in range(n_agents)]
        right["round1"] += sum(task.is_correct(a, truth) for a in first)
        right["round1_majority"] += task.is_correct(majority(first, pid), truth)
        if_kept = []
        for n in range(n_agents):
            critic = turns[("critic", 2, n)]
            others = [first[k] for k in critic["others_order"]]
            summary = turns.get(("summarizer", 2, n))
            numbers = summary_answers(summary["response"]) if summary else []
            if summary:
                summaries["exact"] += numbers == [str(a) for a in others]
                summaries["all"] += 1
            kind, answer = critic_reply_kind(critic["response"]), critic["answer"]
            own = "own_right" if task.is_correct(first[n], truth) else "own_wrong"
            kinds[f"{kind}, {own}, {'right' if task.is_correct(answer, truth) else 'wrong'}"] += 1
            right["round2"] += task.is_correct(answer, truth)
            if kind == "keep":
                keep_wrote["own answer" if answer == first[n] else "a number of its summary" if answer in numbers
                           else "another agent's answer" if answer in others else "none of these"] += 1
            if_kept.append(first[n] if kind == "keep" else answer)
        recorded = turns[("critic", 2, 0)]["majority"]
        finals = [turns[("critic", 2, n)]["answer"] for n in range(n_agents)]
        assert majority(finals, pid) == recorded, (pid, finals, recorded)  # the vote is the debate's
        right["final_majority"] += task.is_correct(recorded, truth)
        right["final_majority_if_keeps_copied"] += task.is_correct(majority(if_kept, pid), truth)
    problems = len(by_problem)
    result = {
        "benchmark": "debate_rounds", "debate_dir": args.debate_dir, "model": cfg.model.path, "problems": problems,
        "agents": n_agents,
        "round1_accuracy": round(right["round1"] / (problems * n_agents), 4),
        "round1_majority_accuracy": round(right["round1_majority"] / problems, 4),
        "round2_accuracy": round(right["round2"] / (problems * n_agents), 4),
        "final_majority_accuracy": round(right["final_majority"] / problems, 4),
        "summaries_exact": f"{summaries['exact']}/{summaries['all']}",
        "critic_replies": dict(sorted(kinds.items())),
        "keep_replies_wrote": dict(keep_wrote),
        "final_majority_if_keeps_copied": round(right["final_majority_if_keeps_copied"] / problems, 4),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
