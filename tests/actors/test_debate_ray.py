"""Integration: real Ray actors, a real tiny HF model, full multi-round debates written to Parquet."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from mft_ray.config import load_config
from mft_ray.run.records import read_records, shard_path
from mft_ray.society.debate import others_order
from mft_ray.society.prompts import PromptSet
from mft_ray.tasks import make_splits, make_task

pytestmark = pytest.mark.integration


def _config(tmp_path, tiny_model, **over):
    base = {
        "run_dir": str(tmp_path / "run"), "model.path": tiny_model, "task.name": "arithmetic",
        "task.finetune_size": 20, "task.eval_size": 4, "sampling.max_new_tokens": 12,
        "debate.shard_size": 8, "resources.num_cpus_per_agent": 0.25,
    }
    base.update(over)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def _run(config):
    """The finetune split's debate as the jobs run it (``stages.debate_split``: skipped when complete)."""
    from actors.runtime import RayRuntime
    from mft_ray import stages
    from mft_ray.run.rundir import RunDir

    task = make_task(config.task)
    problems = make_splits(task, config.task).finetune
    run = RunDir(config.run_dir)
    stats = stages.debate_split(RayRuntime(), config, run, 0, "finetune", problems, None)
    return problems, run.debate_dir(0, "finetune"), stats


def _check_structure(problems, table, agents, rounds, summarize, instruction):
    rows = table.to_pylist()
    keys = Counter((r["problem_id"], r["agent"], r["role"], r["round"]) for r in rows)
    assert all(c == 1 for c in keys.values()), "a (problem, agent, role, round) record is duplicated"
    expected = set()
    for p in problems:
        for n in range(agents):
            expected.add((p.id, n, "generator", 1))
            for m in range(2, rounds + 1):
                expected.add((p.id, n, "critic", m))
                if summarize:
                    expected.add((p.id, n, "summarizer", m))
    assert set(keys) == expected

    prompts = PromptSet(instruction)
    question = {p.id: p.question for p in problems}
    answer_of = {(r["problem_id"], r["agent"], r["round"]): r["response"] for r in rows if r["role"] != "summarizer"}
    summary_of = {(r["problem_id"], r["agent"], r["round"]): r for r in rows if r["role"] == "summarizer"}
    shown = set()
    for r in rows:
        pid, n, m = r["problem_id"], r["agent"], r["round"]
        order = r["others_order"]
        if m == 1:
            assert order is None
        else:
            # The others in the order seeded by (seed, problem, round, agent), as the record says.
            assert order == others_order(0, pid, m, n, agents) and sorted(order) == [k for k in range(agents) if k != n]
            shown.add(tuple(order))
        if r["role"] == "summarizer":
            # s[m,n] is built from exactly the round m-1 responses of the *other* agents, shuffled.
            others = [answer_of[(pid, k, m - 1)] for k in order]
            assert r["messages"] == [{"role": "user", "content": prompts.summary(question[pid], others)}]
        elif r["role"] == "critic":
            msgs = r["messages"]
            # The critic continues its own conversation: its previous turn is its round m-1 answer.
            assert msgs[-2] == {"role": "assistant", "content": answer_of[(pid, n, m - 1)]}
            assert msgs[0]["content"] == prompts.question(question[pid])
            if summarize:
                ctx = summary_of[(pid, n, m)]["response"]
                assert summary_of[(pid, n, m)]["others_order"] == order
            else:
                ctx = prompts.concatenate([answer_of[(pid, k, m - 1)] for k in order])
            assert msgs[-1] == {"role": "user", "content": prompts.critique(ctx, summarize)}
            assert len(msgs) == 2 * m - 1
    if rounds > 1 and agents > 2:
        assert len(shown) > agents, "the others are shown in a few fixed orders, not shuffled"
    # One majority per problem, shared by all of its rows.
    per_problem = {}
    for r in rows:
        per_problem.setdefault(r["problem_id"], set()).add((r["majority"], r["tie"]))
    assert all(len(v) == 1 for v in per_problem.values())


def test_three_agents_two_rounds_separate_engines(ray_cluster, tiny_model, tmp_path):
    config = _config(tmp_path, tiny_model, **{"resources.share_engine": "false"})
    problems, out, stats = _run(config)
    assert stats["shards"] == 3 and stats["skipped_shards"] == 0
    table = read_records(out)
    instruction = make_task(config.task).answer_instruction
    _check_structure(problems, table, agents=3, rounds=2, summarize=True, instruction=instruction)
    # Separate engines with per-agent seeds: the three round-1 answers differ.
    first = [r["response"] for r in table.to_pylist() if r["role"] == "generator" and r["problem_id"] == problems[0].id]
    assert len(set(first)) == 3

    # A rerun skips every finished shard without starting a society.
    mtimes = {k: shard_path(out, k).stat().st_mtime_ns for k in range(3)}
    again = _run(config)[2]
    assert again.get("skipped_all") is True
    # Lose one shard: only that shard is redone, the others are untouched. (Redone on one shared engine: the
    # engine layout is not part of a debate's settings, and one engine starts instead of seven.)
    shard_path(out, 1).unlink()
    again = _run(_config(tmp_path, tiny_model))[2]
    assert again["skipped_shards"] == 2
    assert shard_path(out, 0).stat().st_mtime_ns == mtimes[0]
    assert shard_path(out, 2).stat().st_mtime_ns == mtimes[2]
    _check_structure(problems, read_records(out), 3, 2, True, instruction)


def test_five_agents_three_rounds_shared_engine(ray_cluster, tiny_model, tmp_path):
    config = _config(tmp_path, tiny_model, **{"debate.agents": 5, "debate.rounds": 3})
    problems, out, stats = _run(config)
    table = read_records(out)
    _check_structure(problems, table, agents=5, rounds=3, summarize=True,
                     instruction=make_task(config.task).answer_instruction)
    assert table.num_rows == len(problems) * (5 + 2 * (5 + 5))


def test_without_summary_concatenates_other_answers(ray_cluster, tiny_model, tmp_path):
    config = _config(tmp_path, tiny_model, **{"debate.summarize": "false", "task.finetune_size": 8})
    problems, out, _ = _run(config)
    _check_structure(problems, read_records(out), agents=3, rounds=2, summarize=False,
                     instruction=make_task(config.task).answer_instruction)


def test_society_too_big_for_cluster_fails_at_once(ray_cluster, tiny_model, tmp_path):
    from mft_ray.errors import PlacementError

    config = _config(tmp_path, tiny_model, **{"resources.num_gpus_per_agent": 1})
    start = time.time()
    with pytest.raises(PlacementError, match=r"needs .*GPU=1.*short of GPU=1"):
        _run(config)
    assert time.time() - start < 10


def test_society_blocked_by_other_work_times_out_clearly(ray_cluster, tiny_model, tmp_path):
    import ray

    from mft_ray.errors import PlacementError

    @ray.remote(num_cpus=1.5)
    class Hog:
        def ping(self) -> int:
            return 1

    hog = Hog.remote()
    ray.get(hog.ping.remote())
    config = _config(tmp_path, tiny_model, **{"resources.num_cpus_per_agent": 1,
                                              "resources.placement_timeout_s": 3})
    start = time.time()
    try:
        with pytest.raises(PlacementError, match=r"could not be placed within 3s.*CPU=0.5 free"):
            _run(config)
    finally:
        ray.kill(hog)
    assert time.time() - start < 20
    assert not ray.util.placement_group_table() or all(
        pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())
