"""Methods (mft_ray.methods.registry): config, each method's dataset rule on hand-written debate records, the
label-isolation test, every method through the jobs.iterate driver, and STaR end to end on real Ray.

Dataset rules are checked against sets spelled out by hand from records written in
tests/methods/test_datasets.py's format (every reply names its problem, agent and round).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from mft_ray.config import TaskConfig, load_config
from mft_ray.errors import ConfigError
from mft_ray.methods.datasets import build_sets, build_star_sets
from mft_ray.methods.registry import (
    METHODS,
    SHARED_UNIT,
    get_method,
    method_config,
    prompt_set,
    society_after,
    train_units,
)
from mft_ray.run.preflight import check_config
from mft_ray.run.records import read_records
from mft_ray.society.members import CRITIC, GENERATOR, Member
from mft_ray.tasks import make_task
from tests.conftest import REPO
from tests.methods.test_datasets import (
    TWO_ROUNDS,
    expected_two_rounds,
    gen_example,
    prompt0,
    records_for,
    same_multiset,
)

AGENTS = 3
LABEL_FREE_TRAINED = [n for n in METHODS if not get_method(n).evaluation_only and not get_method(n).uses_labels]


@pytest.fixture(scope="module")
def task():
    return make_task(TaskConfig(name="arithmetic"))


def _sets(name: str, records, task, rounds: int = 2, budget: str = "pooled"):
    return build_sets(get_method(name), records, task.equivalent, agents=AGENTS, rounds=rounds, w=0.5,
                      mix_seed=0, vote_seed=0, single_agent_budget=budget)


# --------------------------------------------------------------------------------------------------
# The setting


def test_every_method_name_loads_from_an_override():
    for name in METHODS:
        assert load_config(None, [f"method={name}"]).method == name
    assert load_config(None, []).method == "multiagent_ft"


def test_unknown_method_names_itself_and_the_valid_names():
    with pytest.raises(ConfigError) as err:
        check_config(load_config(None, ["method=multiagent"]))
    message = str(err.value)
    assert "'multiagent'" in message and message.startswith("method must be one of")
    assert all(name in message for name in METHODS)
    with pytest.raises(ConfigError, match="method must be one of"):
        get_method("STaR")


def test_cli_refuses_an_unknown_method_with_exit_code_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jobs.iterate", "method=ours", f"run_dir={tmp_path / 'r'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error: method must be one of" in proc.stderr and "'ours'" in proc.stderr
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------------------------------
# Registry: debate settings, train units, society mapping


def test_debate_settings_of_each_method():
    cfg = load_config(None, ["debate.agents=5", "debate.rounds=3", "sampling.temperature=0.8", "finetune.iterations=2"])

    def shape(name, stage="evaluate"):
        c = method_config(load_config(None, [f"method={name}", "debate.agents=5", "debate.rounds=3",
                                             "sampling.temperature=0.8", "finetune.iterations=2"]), stage)
        return (c.debate.agents, c.debate.rounds, c.debate.summarize, c.sampling.temperature, c.finetune.iterations)

    assert shape("base") == (1, 1, False, 0.8, 0)
    assert shape("majority") == (5, 1, False, 0.8, 0)
    assert shape("majority_matched") == (15, 1, False, 0.8, 0)  # as many samples as the debate's N x M answers
    assert shape("debate") == (5, 3, True, 0.8, 0)
    assert shape("multiagent_ft") == shape("multiagent_ft", "collect") == (5, 3, True, 0.8, 2)
    assert shape("multiagent_ft_no_summary") == shape("multiagent_ft_no_summary", "collect") == (5, 3, False, 0.8, 2)
    assert shape("single_agent_ft_high_temp") == shape("single_agent_ft_high_temp", "collect") == (5, 3, True, 2.0, 2)
    for name in ("majority_ft", "star"):
        assert shape(name) == (5, 1, False, 0.8, 2)  # scored as the paper does: a vote over N samples
        assert shape(name, "collect") == (5, 1, False, 0.8, 2)  # data from independent samples
    # Table 3: the single-agent FT model (trained on the pooled debate data) answering directly.
    assert shape("single_agent_ft_no_debate") == (1, 1, False, 0.8, 2)
    assert shape("single_agent_ft_no_debate", "collect") == shape("single_agent_ft", "collect") == (5, 3, True, 0.8, 2)
    # The config as given is untouched.
    assert (cfg.debate.agents, cfg.debate.rounds, cfg.sampling.temperature) == (5, 3, 0.8)


def test_prompt_style_of_each_method():
    styles = {n: prompt_set(load_config(None, [f"method={n}"])).style for n in METHODS}
    assert styles.pop("cooperative_ft") == "cooperative"
    assert styles.pop("unique_id_ft") == styles.pop("single_agent_ft_unique_id") == "unique_id"
    assert set(styles.values()) == {"debate"}


def test_train_units_and_society_mapping():
    gens = [Member(GENERATOR, n) for n in range(AGENTS)]
    crits = [Member(CRITIC, n) for n in range(AGENTS)]
    previous = {m: f"prev/{m}" for m in gens + crits}

    units = train_units(get_method("multiagent_ft"), AGENTS)
    assert [(u.name, u.role, u.index, u.members) for u in units] == \
        [(str(m), m.role, m.index, (m,)) for m in gens + crits]
    society = society_after(get_method("multiagent_ft"), AGENTS, {u.name: f"new/{u.name}" for u in units}, previous)
    assert society == {str(m): f"new/{m}" for m in gens + crits}

    no_critic = get_method("multiagent_ft_no_critic")
    units = train_units(no_critic, AGENTS)
    assert [u.name for u in units] == [str(m) for m in gens]
    society = society_after(no_critic, AGENTS, {u.name: f"new/{u.name}" for u in units}, previous)
    assert society == {**{str(m): f"new/{m}" for m in gens}, **{str(m): f"prev/{m}" for m in crits}}

    for name in ("single_agent_ft", "single_agent_ft_high_temp", "single_agent_ft_unique_id",
                 "single_agent_ft_no_debate", "majority_ft", "star"):
        (unit,) = train_units(get_method(name), AGENTS)
        assert unit.name == SHARED_UNIT and unit.role == GENERATOR and set(unit.members) == set(gens + crits)
        assert set(society_after(get_method(name), AGENTS, {SHARED_UNIT: "one"}, previous).values()) == {"one"}

    for name in ("base", "majority", "majority_matched", "debate"):
        assert train_units(get_method(name), AGENTS) == []


# --------------------------------------------------------------------------------------------------
# Dataset rules on hand-written records


def test_multiagent_rules_give_each_agent_its_own_sets(task):
    want = expected_two_rounds()
    for name in ("multiagent_ft", "multiagent_ft_no_summary", "cooperative_ft", "unique_id_ft"):
        files, counts = _sets(name, records_for(TWO_ROUNDS), task)
        for n in range(AGENTS):
            assert files[f"generator_{n}"] == want[n].generator
            # One side of each agent's D^C is empty, so its mix is the other side whole.
            assert same_multiset(files[f"critic_{n}"], want[n].corrected + want[n].kept)
        assert counts["trained"] == {"generator_0": 3, "generator_1": 2, "generator_2": 0,
                                     "critic_0": 2, "critic_1": 1, "critic_2": 2}


def test_no_critic_trains_generators_only(task):
    files, counts = _sets("multiagent_ft_no_critic", records_for(TWO_ROUNDS), task)
    assert counts["trained"] == {"generator_0": 3, "generator_1": 2, "generator_2": 0}
    assert files["generator_1"] == expected_two_rounds()[1].generator


def test_single_agent_rules_pool_every_agents_generator_and_critic_sets(task):
    want = expected_two_rounds()
    pooled = [ex for s in want for ex in (*s.generator, *s.corrected, *s.kept)]
    for name in ("single_agent_ft", "single_agent_ft_high_temp", "single_agent_ft_unique_id",
                 "single_agent_ft_no_debate"):
        files, counts = _sets(name, records_for(TWO_ROUNDS), task)
        assert list(files) == [SHARED_UNIT]
        assert same_multiset(files[SHARED_UNIT], pooled) and len(pooled) == 10
        assert counts["trained"] == {SHARED_UNIT: 10}
        assert counts["pooled"] == {"examples": 10, "kept": 10, "budget": "pooled"}


def test_the_single_model_gets_one_generators_budget_by_default(task):
    want = expected_two_rounds()
    pooled = [ex for s in want for ex in (*s.generator, *s.corrected, *s.kept)]
    files, counts = _sets("single_agent_ft", records_for(TWO_ROUNDS), task, budget="member")
    # Generator sets of 3, 2 and 0 examples: one generator's mean is 5/3 -> 2 of the 10 pooled examples.
    got = files[SHARED_UNIT]
    assert len(got) == 2 and counts["trained"] == {SHARED_UNIT: 2}
    assert counts["pooled"] == {"examples": 10, "kept": 2, "budget": "member"}
    assert all(ex in pooled for ex in got)
    assert _sets("single_agent_ft", records_for(TWO_ROUNDS), task, budget="member")[0] == files  # seeded
    assert load_config(None, []).finetune.single_agent_budget == "member"
    with pytest.raises(ConfigError, match="single_agent_budget must be one of"):
        load_config(None, ["finetune.single_agent_budget=all"])


def test_majority_rule_votes_over_round_one_and_ignores_the_debate(task):
    for name in ("majority_ft",):
        files, counts = _sets(name, records_for(TWO_ROUNDS), task)
        got = files[SHARED_UNIT]
        # p1 (7,7,9) and p3 (2,2,3): agents 0 and 1. p2 (4,4,5): agents 0 and 1 although the debate's final
        # majority is None. p0 (0.50, 3, unparseable) is a 1-1 tie: exactly one of agents 0 and 1.
        fixed = [gen_example("p1", 0, "7"), gen_example("p1", 1, "7"), gen_example("p2", 0, "4"),
                 gen_example("p2", 1, "4"), gen_example("p3", 0, "2"), gen_example("p3", 1, "2")]
        assert [ex for ex in got if ex["problem_id"] != "p0"] == sorted(fixed, key=lambda e: e["problem_id"])
        p0 = [ex for ex in got if ex["problem_id"] == "p0"]
        assert p0 in ([gen_example("p0", 0, "0.50")], [gen_example("p0", 1, "3")])
        assert counts["trained"] == {SHARED_UNIT: 7}
        assert _sets(name, records_for(TWO_ROUNDS), task)[0] == files  # the tie-break is seeded


def test_majority_rule_on_one_round_records(task):
    problems = {
        "m0": dict(answers=[["0.50"], ["0.5"], ["2"]], majority="0.50"),  # 0.50 ≡ 0.5: agents 0 and 1
        "m1": dict(answers=[[None], [None], [None]], majority=None),  # nothing parsed: nothing
        "m2": dict(answers=[["7"], ["7"], ["7"]], majority="7"),  # everyone
    }
    files, _ = _sets("majority_ft", records_for(problems), task, rounds=1)
    assert files[SHARED_UNIT] == [gen_example("m0", 0, "0.50"), gen_example("m0", 1, "0.5"),
                                  gen_example("m2", 0, "7"), gen_example("m2", 1, "7"), gen_example("m2", 2, "7")]


STAR_PROBLEMS = {
    "s0": dict(answers=[["0.50"], ["3"], [None]], majority=None),  # label 0.5: agent 0 right
    "s1": dict(answers=[["6"], ["6"], ["6"]], majority="6"),  # label 6: all right
    "s2": dict(answers=[["1"], ["2"], ["3"]], majority="1"),  # label 9: all wrong
}
STAR_LABELS = {"s0": "0.5", "s1": "6", "s2": "9"}
STAR_RATIONALIZATIONS = [
    {"problem_id": "s0", "agent": 1, "response": "[s0] with the hint: \\boxed{1/2}"},  # ≡ 0.5: kept
    {"problem_id": "s0", "agent": 2, "response": "[s0] with the hint: \\boxed{7}"},  # wrong: dropped
    {"problem_id": "s2", "agent": 0, "response": "[s2] no boxed answer"},  # unparseable: dropped
    {"problem_id": "s2", "agent": 1, "response": "[s2] with the hint: \\boxed{9}"},
    {"problem_id": "s2", "agent": 2, "response": "[s2] with the hint: \\boxed{9.0}"},
]


def _rationalized(pid: str, n: int, response: str) -> dict:
    # The un-hinted round-1 prompt of that agent, then the rationalization.
    return {"problem_id": pid, "messages": [{"role": "user", "content": prompt0(pid, n)},
                                            {"role": "assistant", "content": response}]}


def test_star_keeps_correct_answers_and_rationalizations_that_reach_the_label(task):
    from mft_ray.methods.datasets import star_requests

    records = records_for(STAR_PROBLEMS)
    assert star_requests(records, STAR_LABELS, task.is_correct) == \
        [("s0", 1), ("s0", 2), ("s2", 0), ("s2", 1), ("s2", 2)]
    files, counts = build_star_sets(records, STAR_LABELS, STAR_RATIONALIZATIONS, task.is_correct,
                                    task.extract_answer)
    r = {(x["problem_id"], x["agent"]): x["response"] for x in STAR_RATIONALIZATIONS}
    assert files == {SHARED_UNIT: [
        gen_example("s0", 0, "0.50"), _rationalized("s0", 1, r["s0", 1]),
        gen_example("s1", 0, "6"), gen_example("s1", 1, "6"), gen_example("s1", 2, "6"),
        _rationalized("s2", 1, r["s2", 1]), _rationalized("s2", 2, r["s2", 2]),
    ]}
    assert counts == {"star": {"samples": 9, "correct": 4, "rationalized": 3, "failed": 2},
                      "trained": {SHARED_UNIT: 7}}


def test_star_refuses_missing_labels_or_rationalizations(task):
    records = records_for(STAR_PROBLEMS)
    with pytest.raises(ValueError, match="no ground-truth label for problem s2"):
        build_star_sets(records, {"s0": "0.5", "s1": "6"}, STAR_RATIONALIZATIONS, task.is_correct, task.extract_answer)
    with pytest.raises(ValueError, match="problem s2, agent 1: wrong round-1 answer but no rationalization"):
        build_star_sets(records, STAR_LABELS, [x for x in STAR_RATIONALIZATIONS if x["agent"] != 1 or x["problem_id"] != "s2"],
                        task.is_correct, task.extract_answer)


def test_label_free_builder_refuses_star_and_evaluation_only_methods(task):
    for name in ("star", "base", "majority", "debate"):
        with pytest.raises(ValueError):
            _sets(name, records_for(TWO_ROUNDS), task)


# --------------------------------------------------------------------------------------------------
# Every method through Algorithm 1's driver (mft_ray.algorithm) (debates, finetunes and the rationalization model faked),
# with finetune-split labels that log every read: only STaR reads them.


class SealedProblem:
    """A finetune-split problem whose ground truth is logged whenever anything reads it."""

    def __init__(self, problem, reads: list[str]) -> None:
        self.id, self.question, self.meta = problem.id, problem.question, problem.meta
        self._answer, self._reads = problem.answer, reads

    @property
    def answer(self) -> str:
        self._reads.append(self.id)
        return self._answer


def _fake_checkpoint(path: Path, adapter_of: str | None = None) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    if adapter_of is not None:  # a LoRA adapter of that base
        (path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": adapter_of, "r": 8}))
        save_file({"w": np.zeros(1, dtype=np.float32)}, str(path / "adapter_model.safetensors"))
    else:
        (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
        save_file({"w": np.zeros(1, dtype=np.float32)}, str(path / "model.safetensors"))
    (path / "train_metrics.json").write_text(json.dumps({"loss_before": 1.0, "loss_after": 0.5}))
    return path


@pytest.fixture(scope="module")
def fake_model(tmp_path_factory) -> str:
    return str(_fake_checkpoint(tmp_path_factory.mktemp("fake-model")))


def _drive(monkeypatch, run_dir: Path, model: str, method: str, *overrides: str) -> dict:
    """Run Algorithm 1 (``mft_ray.algorithm``, what jobs.iterate runs) for one iteration of ``method`` with every
    Ray stage replaced by a fake that records what it was asked; returns what was seen."""
    from mft_ray import algorithm, stages
    from mft_ray.run.records import write_shard
    from mft_ray.society.voting import majority_vote, vote_rng

    seen: dict = {"debates": [], "evals": [], "jobs": [], "generate": [], "reads": []}
    real_splits = algorithm.make_splits

    def sealed_splits(task, cfg):
        splits = real_splits(task, cfg)
        splits.finetune[:] = [SealedProblem(p, seen["reads"]) for p in splits.finetune]
        seen["finetune_ids"] = [p.id for p in splits.finetune]
        return splits

    def fake_debate(config, iteration, split, problems, out_dir, model_paths=None):
        seen["debates"].append((iteration, split, config, model_paths))
        equivalent = make_task(config.task).equivalent
        prompts = prompt_set(config)
        rows = []
        for i, p in enumerate(problems):  # only id and question, as the real debate_split
            first = ["1" if (i + n) % 3 else "2" for n in range(config.debate.agents)]
            finals = first if config.debate.rounds == 1 else ["1"] * config.debate.agents
            vote = majority_vote(finals, equivalent, vote_rng(config.seed, p.id))
            for n in range(config.debate.agents):
                conv = [{"role": "user", "content": prompts.question(p.question, n)}]
                base = {"iteration": iteration, "split": split, "problem_id": p.id, "agent": n,
                        "majority": vote.answer, "tie": vote.tie, "consensus": vote.consensus}
                text = f"so \\boxed{{{first[n]}}}"
                rows.append({**base, "role": "generator", "round": 1, "messages": conv, "response": text,
                             "answer": first[n]})
                for m in range(2, config.debate.rounds + 1):
                    conv = [*conv, {"role": "assistant", "content": text},
                            {"role": "user", "content": prompts.critique("others", config.debate.summarize, n)}]
                    text = "so \\boxed{1}"
                    rows.append({**base, "role": "critic", "round": m, "messages": conv, "response": text,
                                 "answer": "1"})
        write_shard(out_dir, 0, rows, [p.id for p in problems])
        return {}

    def fake_evaluate(runtime, config, run, task, problems, iteration, model_paths):
        seen["evals"].append((iteration, config, model_paths))
        return {"iteration": iteration, "problems": len(problems), "accuracy": 0.5, "stderr": 0.1,
                "consensus": 1.0, "base_accuracy": 0.5, "base_stderr": 0.1, "majority_accuracy": 0.5,
                "majority_stderr": 0.1}

    def fake_finetunes(jobs, *args, **kwargs):
        seen["jobs"].extend(jobs)
        for j in jobs:  # a whole (if tiny) checkpoint or LoRA adapter, as the run directory's checks expect
            _fake_checkpoint(Path(j.output_dir), adapter_of=j.init_path if j.spec.lora else None)
        return {j.name: {"examples": len(Path(j.data_path).read_text().splitlines()), "loss_before": 1.0,
                         "loss_after": 0.5} for j in jobs}

    def fake_generate(config, model_paths, requests, seed_parts, name=""):
        seen["generate"].append((config, model_paths, requests))
        out = {}
        for member, convs in requests.items():
            out[member] = []
            for k, conv in enumerate(convs):
                hint = re.search(r"the correct final answer is (.+?)\. ", conv[-1]["content"]).group(1)
                out[member].append(f"so \\boxed{{{hint if k % 2 == 0 else 'x'}}}")
        return out

    monkeypatch.setattr(algorithm, "make_splits", sealed_splits)
    monkeypatch.setattr(stages, "evaluate_society", fake_evaluate)
    monkeypatch.setattr(algorithm, "write_report", lambda run, summary: "table")
    # The stages' runtime with every Ray call faked (stages.Runtime's methods).
    runtime = SimpleNamespace(debate=fake_debate, generate=fake_generate, check_finetunes_fit=lambda ft: None,
                              finetune=lambda jobs, ft, storage_path: fake_finetunes(jobs), release=lambda: None)
    config = load_config(None, [f"run_dir={run_dir}", f"model.path={model}", f"method={method}", "task.max_int=3",
                                "task.finetune_size=6", "task.eval_size=3", "finetune.iterations=1",
                                "debate.agents=3", "debate.rounds=2", "sampling.temperature=0.7", *overrides])
    seen["summary"] = algorithm.run_algorithm(config, lambda: runtime)
    return seen


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_through_the_driver_and_only_star_reads_labels(method, monkeypatch, tmp_path, fake_model):
    m = get_method(method)
    run_dir = tmp_path / "run"
    seen = _drive(monkeypatch, run_dir, fake_model, method)
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["method"] == method and summary["method_info"]["title"] == m.title

    # The label-isolation check: no path but STaR's reads a finetune-split answer.
    if m.uses_labels:
        assert set(seen["reads"]) == set(seen["finetune_ids"]) and len(seen["finetune_ids"]) == 6
    else:
        assert seen["reads"] == [], f"{method} read ground-truth labels of {sorted(set(seen['reads']))}"

    if m.evaluation_only:
        assert [e[0] for e in seen["evals"]] == [0] and seen["debates"] == seen["jobs"] == []
        _, config, _ = seen["evals"][0]
        assert config.debate.agents == {"base": 1, "majority_matched": 6}.get(method, 3)
        assert config.debate.rounds == (2 if method == "debate" else 1)
        assert [e["iteration"] for e in summary["iterations"]] == [0]
        return

    # One finetune-split debate by the base society, with the method's data-debate settings.
    ((it, split, collect, paths),) = seen["debates"]
    assert (it, split, paths) == (0, "finetune", None)
    assert collect.debate.rounds == (m.collect_rounds or 2)
    assert collect.sampling.temperature == pytest.approx(m.temperature or 0.7)
    assert collect.debate.summarize == (m.collect_rounds is None and m.summarize is not False)
    rows = read_records(run_dir / "iter_0" / "debate_finetune").to_pylist()
    prompt = next(r for r in rows if r["agent"] == 1 and r["round"] == 1)["messages"][0]["content"]
    assert prompt.startswith("Agent ID: GEN2 (This is a generation agent 2 tasked with creating a solution.)\n\n") \
        == (m.prompt_style == "unique_id")

    # Finetunes: exactly the method's units, each on its own file; counts.json says so.
    units = train_units(m, 3)
    counts = json.loads((run_dir / "iter_1" / "datasets" / "counts.json").read_text())
    assert counts["method"] == method and sorted(counts["trained"]) == sorted(u.name for u in units)
    assert sum(counts["trained"].values()) > 0
    # A unit with no examples keeps its weights instead of being finetuned.
    assert [j.name for j in seen["jobs"]] == [u.name for u in units if counts["trained"][u.name]]
    for job in seen["jobs"]:
        assert Path(job.data_path) == run_dir / "iter_1" / "datasets" / f"{job.name}.jsonl"
        assert job.init_path == fake_model

    # The society evaluated at iteration 1.
    society = json.loads((run_dir / "iter_1" / "society.json").read_text())
    assert set(society) == {f"{r}_{n}" for r in (GENERATOR, CRITIC) for n in range(3)}
    if m.shared_model:
        assert set(society.values()) == {str(run_dir / "iter_1" / SHARED_UNIT)}
    elif method == "multiagent_ft_no_critic":
        assert all(society[f"critic_{n}"] == fake_model for n in range(3))
        assert all(society[f"generator_{n}"] != fake_model for n in range(3) if counts["trained"][f"generator_{n}"])
    else:
        assert all(society[k] in (str(run_dir / "iter_1" / k), fake_model) for k in society)
    (it1, eval_config, eval_paths) = seen["evals"][1]
    evaluated = {str(k): v for k, v in eval_paths.items() if k.role != "summarizer"}
    assert it1 == 1 and evaluated.items() <= society.items()
    assert eval_config.sampling.temperature == pytest.approx(m.temperature or 0.7)
    # Scored as the paper scores the method: the debate, a vote over N samples, or one sample.
    shape = {"debate": (3, 2, m.summarize is not False), "samples": (3, 1, False), "single": (1, 1, False)}
    assert (eval_config.debate.agents, eval_config.debate.rounds, eval_config.debate.summarize) == shape[m.evaluation]
    assert len(evaluated) == (2 if m.evaluation == "single" else 6)

    if m.uses_labels:
        # The rationalization pass asked the base generators with the label as a hint; no hint is trained on.
        (gen_config, gen_paths, requests) = seen["generate"][0]
        assert gen_paths is None and gen_config.debate.rounds == 1
        hinted = [c[-1]["content"] for convs in requests.values() for c in convs]
        assert hinted and all("the correct final answer is" in h for h in hinted)
        trained = (run_dir / "iter_1" / "datasets" / f"{SHARED_UNIT}.jsonl").read_text()
        assert trained and "Hint" not in trained and "correct final answer" not in trained
        assert counts["star"]["rationalized"] > 0
    else:
        assert seen["generate"] == []


def test_second_iteration_starts_from_the_first_and_untrained_critics_stay_base(monkeypatch, tmp_path, fake_model):
    seen = _drive(monkeypatch, tmp_path / "one", fake_model, "single_agent_ft", "finetune.iterations=2")
    first, second = seen["jobs"]
    assert (first.name, second.name) == (SHARED_UNIT, SHARED_UNIT)
    assert (first.init_path, second.init_path) == (fake_model, str(tmp_path / "one" / "iter_1" / SHARED_UNIT))
    # Society 1 debated the iteration-2 finetune split with its one model in every seat.
    (_, _, _, paths) = seen["debates"][1]
    assert {v for k, v in paths.items() if k.role != "summarizer"} == {second.init_path}

    seen = _drive(monkeypatch, tmp_path / "two", fake_model, "multiagent_ft_no_critic", "finetune.iterations=2")
    assert {j.name.split("_")[0] for j in seen["jobs"]} == {GENERATOR}
    society = json.loads((tmp_path / "two" / "iter_2" / "society.json").read_text())
    assert all(society[f"critic_{n}"] == fake_model for n in range(3))


def test_a_run_dir_of_another_method_is_refused(monkeypatch, tmp_path, fake_model):
    _drive(monkeypatch, tmp_path / "run", fake_model, "majority")
    with pytest.raises(ConfigError, match="holds a run of method 'majority', not 'star'"):
        _drive(monkeypatch, tmp_path / "run", fake_model, "star")


def test_build_datasets_refuses_labels_for_label_free_methods(tmp_path, task):
    from mft_ray.run.rundir import RunDir
    from mft_ray.stages import build_datasets

    config = load_config(None, ["method=single_agent_ft"])
    with pytest.raises(ValueError, match="must not get ground-truth labels"):
        build_datasets(config, RunDir(tmp_path), task, 1, labels={"p": "1"}, rationalizations=[])
    with pytest.raises(ValueError, match="needs ground-truth labels"):
        build_datasets(load_config(None, ["method=star"]), RunDir(tmp_path), task, 1)


# --------------------------------------------------------------------------------------------------
# End to end on real Ray: STaR, one iteration, with the mini testbed


@pytest.mark.integration
def test_star_runs_one_iteration_end_to_end_with_one_shared_checkpoint(ray_cluster, testbed_mini, tmp_path):
    """Real debates, the rationalization pass through the agent actors, one Ray Train finetune, and an
    evaluation debate in which every generator and critic is the STaR checkpoint."""
    from jobs.iterate import main
    from mft_ray.methods.datasets import star_requests
    from mft_ray.run.rundir import RunDir
    from mft_ray.tasks import make_splits

    run_dir = tmp_path / "star"
    config = load_config(REPO / "jobs/configs/iterate_cpu.yaml", [
        "method=star", "finetune.iterations=1", "task.finetune_size=12", "task.eval_size=6",
        "debate.shard_size=12", f"run_dir={run_dir}", f"model.path={testbed_mini}",
        # Diversity metrics are tested elsewhere; the held-out scorer would add an actor per evaluation.
        "metrics.embedding=false", "metrics.nll_problems=0"])
    summary = main(config)
    assert summary["method"] == "star" and [e["iteration"] for e in summary["iterations"]] == [0, 1]

    # The data debate was 1 round of 3 independent samples, and so is the evaluation: STaR is scored as the paper
    # scores it, by samples of its final model (the vote over 3, and one sample).
    run, task = RunDir(run_dir), make_task(config.task)
    data = read_records(run.debate_dir(0, "finetune"))
    assert set(data["round"].to_pylist()) == {1} and len(data) == 12 * 3
    evaluation = read_records(run.debate_dir(1, "eval"))
    assert set(evaluation["round"].to_pylist()) == {1} and len(evaluation) == 6 * 3
    assert 0 <= summary["iterations"][1]["base_accuracy"] <= 1

    # Every wrong round-1 answer was re-asked once, with its label as the hint, by the generator that wrote it.
    labels = {p.id: p.answer for p in make_splits(task, config.task).finetune}
    asked = [json.loads(line) for line in run.rationalizations_path(1).read_text().splitlines()]
    assert sorted((r["problem_id"], r["agent"]) for r in asked) == star_requests(data, labels, task.is_correct)
    for r in asked:
        assert f"the correct final answer is {labels[r['problem_id']]}." in r["messages"][0]["content"]

    counts = json.loads((run.datasets_dir(1) / "counts.json").read_text())
    star = counts["star"]
    assert star["samples"] == 36 and star["correct"] + star["rationalized"] + star["failed"] == 36
    assert star["rationalized"] + star["failed"] == len(asked)
    assert counts["trained"] == {SHARED_UNIT: star["correct"] + star["rationalized"]} and star["correct"] > 0

    # One finetune; its checkpoint is every generator and critic of society 1, and its loss fell.
    finetunes = json.loads((run.iteration_dir(1) / "finetunes.json").read_text())
    assert list(finetunes) == [SHARED_UNIT] and finetunes[SHARED_UNIT]["loss_after"] < finetunes[SHARED_UNIT]["loss_before"]
    checkpoint = run.agent_dir(1, SHARED_UNIT)
    assert (checkpoint / "config.json").is_file()
    society = json.loads(run.society_path(1).read_text())
    assert society == {f"{r}_{n}": str(checkpoint) for r in (GENERATOR, CRITIC) for n in range(3)}


@pytest.mark.parametrize("init_from", ["previous", "base"])
def test_a_lora_agent_continues_its_own_adapter_on_the_frozen_base(init_from, monkeypatch, tmp_path, fake_model):
    """finetune.adapter=lora: every finetune starts from the base model; from iteration 2 with
    ``init_from: previous`` it continues the agent's own iteration-1 adapter, with ``base`` a new one. Society
    1 (its adapters) debates the finetune split of iteration 2."""
    run_dir = tmp_path / "run"
    seen = _drive(monkeypatch, run_dir, fake_model, "multiagent_ft", "finetune.iterations=2",
                  f"finetune.init_from={init_from}", "finetune.adapter=lora", "finetune.zero_stage=2")
    first = {j.name: j for j in seen["jobs"] if j.iteration == 1}
    second = {j.name: j for j in seen["jobs"] if j.iteration == 2}
    assert first and set(second) == set(first)
    assert all(j.init_path == fake_model and j.init_adapter is None and j.spec.lora for j in first.values())
    for name, job in second.items():
        assert job.init_path == fake_model
        assert job.init_adapter == (str(run_dir / "iter_1" / name) if init_from == "previous" else None)
    society_1 = json.loads((run_dir / "iter_1" / "society.json").read_text())
    assert {str(m): p for m, p in seen["debates"][1][3].items()} == {**society_1, "summarizer": fake_model}
    assert all((Path(p) / "adapter_config.json").is_file() for p in society_1.values())


@pytest.mark.parametrize("init_from", ["previous", "base"])
def test_iteration_two_starts_from_iteration_one_weights_at_the_later_learning_rate(init_from, monkeypatch, tmp_path,
                                                                                   fake_model):
    """Algorithm 1's second iteration (the Ray run of it is in benchmarks/faults.py and make demo): society 1
    debates the finetune split, and each agent's finetune starts from its own iteration-1 checkpoint
    (``init_from: previous``) or the base model, with ``later_learning_rate`` / ``later_weight_decay``."""
    run_dir = tmp_path / "run"
    seen = _drive(monkeypatch, run_dir, fake_model, "multiagent_ft", "finetune.iterations=2",
                  f"finetune.init_from={init_from}", "finetune.generator.learning_rate=1e-5",
                  "finetune.later_learning_rate=3e-7", "finetune.later_weight_decay=0.02")
    first = {j.name: j for j in seen["jobs"] if j.iteration == 1}
    second = {j.name: j for j in seen["jobs"] if j.iteration == 2}
    assert first and set(second) == set(first)
    society_1 = json.loads((run_dir / "iter_1" / "society.json").read_text())
    assert [(d[0], d[1]) for d in seen["debates"]] == [(0, "finetune"), (1, "finetune")]
    assert seen["debates"][0][3] is None  # the base society, then society 1 (the summarizer stays the base)
    assert {str(m): p for m, p in seen["debates"][1][3].items()} == {**society_1, "summarizer": fake_model}
    for name, job in second.items():
        assert job.init_path == (str(run_dir / "iter_1" / name) if init_from == "previous" else fake_model)
        assert (job.spec.learning_rate, job.spec.weight_decay) == (3e-7, 0.02)
        assert job.spec.seed != first[name].spec.seed
        assert first[name].spec.learning_rate == (1e-5 if name.startswith(GENERATOR) else 5e-7)
    assert [e[0] for e in seen["evals"]] == [0, 1, 2]
