"""Scaling the society is a config change: 5 agents end to end through `mft evaluate` (debate.agents=5);
a society bigger than the cluster fails at once with what it needs and what exists, exit code 3.

Also covered elsewhere: 5 agents x 3 rounds (tests/actors/test_debate_ray.py), members on separate fractional-CPU
engine actors in one placement group (test_debate_ray.py; the service in tests/actors/test_service.py), a
society blocked by other work failing after resources.placement_timeout_s (test_debate_ray.py), and a
finetune bigger than the cluster refused before any debate (tests/jobs/test_bad_input.py). One actor per
member for 5 agents (11 actors) works too but costs ~2 minutes of actor start-up on 2 CPUs, so the
end-to-end test here shares the engine, as iteration 0 does by default.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter

import pytest

from jobs import cli
from mft_ray.run.records import read_records
from tests.conftest import REPO

pytestmark = pytest.mark.integration

CONFIG = str(REPO / "jobs/configs/iterate_cpu.yaml")


def test_five_agents_end_to_end(ray_cluster, testbed_mini, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = cli.main(["evaluate", "--config", CONFIG, f"run_dir={run_dir}", f"model.path={testbed_mini}",
                     "debate.agents=5", "task.eval_size=4", "debate.shard_size=2",
                     # the diversity metrics' encoder and held-out scorer are tested elsewhere; not needed here
                     "metrics.embedding=false", "metrics.nll_problems=0"])
    assert code == 0, capsys.readouterr().err[-3000:]
    rows = read_records(run_dir / "iter_0" / "debate_eval").to_pylist()
    problems = {r["problem_id"] for r in rows}
    assert len(problems) == 4
    seen = Counter((r["problem_id"], r["role"], r["round"]) for r in rows)
    agents = {(r["problem_id"], r["role"], r["round"]): set() for r in rows}
    for r in rows:
        agents[(r["problem_id"], r["role"], r["round"])].add(r["agent"])
    for pid in problems:
        for key in ((pid, "generator", 1), (pid, "summarizer", 2), (pid, "critic", 2)):
            assert seen[key] == 5 and agents[key] == set(range(5)), (key, seen[key], agents[key])
    assert len(rows) == 4 * 15
    # Per-agent seeds: the five generators do not all give the same round-1 reply.
    first = [r["response"] for r in rows if r["role"] == "generator" and r["problem_id"] == min(problems)]
    assert len(set(first)) >= 3
    # The majority is one of the five critics' final answers.
    for pid in problems:
        finals = [r for r in rows if r["problem_id"] == pid and r["role"] == "critic"]
        assert finals[0]["majority"] is None or finals[0]["majority"] in {r["answer"] for r in finals}
    metrics = json.loads((run_dir / "iter_0" / "metrics.json").read_text())
    assert metrics["agents"] == 5 and metrics["problems"] == 4


@pytest.mark.parametrize("override, short", [
    ("resources.num_gpus_per_agent=1", r"short of CPU=0\.75, GPU=11\."),
    ("resources.num_cpus_per_agent=50", r"short of CPU=548\."),
])
def test_society_bigger_than_the_cluster_exits_3_at_once(ray_cluster, tiny_model, tmp_path, capsys,
                                                         override, short):
    start = time.monotonic()
    code = cli.main(["evaluate", "--config", CONFIG, f"run_dir={tmp_path / 'run'}", f"model.path={tiny_model}",
                     "debate.agents=5", "resources.share_engine=false", "task.eval_size=4", override])
    err = capsys.readouterr().err
    assert code == 3, err[-3000:]
    last = err.strip().splitlines()[-1]
    # What it needs (11 bundles, one per member), what the cluster has, and what to change.
    assert last.startswith("error: society-iter0-eval needs ") and "in 11 bundles" in last, last
    assert "whole cluster has CPU=2;" in last and re.search(short, last) and "resources.num_*_per_agent" in last, last
    assert "Traceback" not in err
    assert time.monotonic() - start < 15
    assert not list((tmp_path / "run").rglob("*.parquet"))
