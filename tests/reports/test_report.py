"""Integration: diversity metrics in a real `jobs.evaluate` run, zero-shot transfer with --society-from,
and `jobs.report` over real and hand-made run directories (report.md, every figure, the Table 1 grid)."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from mft_ray.config import load_config
from tests.conftest import REPO, SHARED_DATA

pytestmark = pytest.mark.integration

PNG = b"\x89PNG\r\n\x1a\n"
# The held-out scorers must be placed and loaded within resources.placement_timeout_s or their metric is
# skipped: 60 s was passed once when the other test worker loaded the machine (CI of 98011ac).
SIZES = ["task.eval_size=6", "task.finetune_size=6", "debate.shard_size=6", "metrics.nll_problems=3",
         "resources.placement_timeout_s=600"]


def _config(run_dir: Path, model: str, *extra: str):
    return load_config(REPO / "jobs/configs/iterate_cpu.yaml", [*SIZES, f"run_dir={run_dir}", f"model.path={model}",
                                                               *extra])


def _entry(zero: dict, iteration: int, acc: float, se: float, div: float) -> dict:
    e = copy.deepcopy(zero)
    e.update(iteration=iteration, accuracy=acc, stderr=se, consensus=1 - div, diversity=div,
             answer_freq_kl=div / 2, embedding_dissimilarity=div / 3, critic_nll=1 + div, base_nll=2 + div)
    return e


def _variant(source: Path, target: Path, summary: dict, **config_changes) -> Path:
    """A hand-made run directory: ``summary`` as metrics.json, source's config.yaml with changes."""
    target.mkdir(parents=True)
    cfg = yaml.safe_load((source / "config.yaml").read_text())
    for dotted, value in config_changes.items():
        node = cfg
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    (target / "config.yaml").write_text(yaml.safe_dump(cfg))
    (target / "metrics.json").write_text(json.dumps(summary))
    return target


@pytest.fixture(scope="module")
def runs(ray_cluster, testbed_mini, lively_model, tmp_path_factory):
    """maft: a real jobs.evaluate run (iteration 0) given two hand-made finetuned iterations and a society 1
    made of the testbed itself; saft / gsm8k: hand-made variants; transfer: society 1 of maft evaluated for
    real on GSM8K with --society-from."""
    from jobs.evaluate import main as evaluate

    root = tmp_path_factory.mktemp("report")
    maft = root / "maft"
    first = evaluate(_config(maft, testbed_mini))
    summary = json.loads((maft / "metrics.json").read_text())
    zero = summary["iterations"][0]
    summary["iterations"] += [_entry(zero, 1, 0.8, 0.1, 0.4), _entry(zero, 2, 1.0, 0.0, 0.35)]
    (maft / "metrics.json").write_text(json.dumps(summary))
    society = {f"{role}_{n}": testbed_mini for role in ("generator", "critic") for n in range(3)}
    society["critic_0"] = lively_model  # another model as the held-out critic of the critic NLL
    (maft / "iter_1").mkdir()
    (maft / "iter_1" / "society.json").write_text(json.dumps(society))

    saft = _variant(maft, root / "saft", {**summary, "method": "single_agent_ft", "iterations": [
        zero, _entry(zero, 1, 0.6, 0.2, 0.1), _entry(zero, 2, 0.5, 0.2, 0.05)]}, method="single_agent_ft")
    g_zero = {**zero, "task": "gsm8k", "accuracy": 0.4, "stderr": 0.2, "base_accuracy": 0.2, "base_stderr": 0.16,
              "majority_accuracy": 0.3, "majority_stderr": 0.19}
    gsm8k = _variant(maft, root / "gsm8k", {**summary, "task": "gsm8k", "iterations": [g_zero]}, task__name="gsm8k")

    transfer = root / "transfer"
    evaluate(_config(transfer, testbed_mini, "task.name=gsm8k", f"task.path={SHARED_DATA / 'gsm8k' / 'test.jsonl'}",
                     "task.eval_size=3", "task.finetune_size=0", "debate.shard_size=3"),
             iteration=1, society_from=str(maft))
    return {"maft": maft, "saft": saft, "gsm8k": gsm8k, "transfer": transfer, "first": first}


def test_evaluation_saves_every_diversity_metric(runs, testbed_mini):
    from mft_ray.engines.hf import HFEngine
    from mft_ray.metrics import diversity
    from mft_ray.run.records import read_records
    from mft_ray.tasks import make_splits, make_task

    maft = runs["maft"]
    saved = json.loads((maft / "iter_0" / "metrics.json").read_text())
    assert saved == runs["first"]
    names = ("answer_freq_kl", "embedding_dissimilarity", "critic_nll", "base_nll")
    assert {k: saved[k] is None for k in names} == dict.fromkeys(names, False)
    assert saved["diversity"] == pytest.approx(1 - saved["consensus"])
    details = saved["diversity_details"]
    assert details["skipped"] == {} and details["embedding_problems"] == 6
    assert details["base_nll"]["problems"] == details["critic_nll"]["problems"] == 3
    # The same figures computed here directly from the records: the wiring adds or drops nothing.
    config = _config(maft, testbed_mini)
    task = make_task(config.task)
    ids = [p.id for p in make_splits(task, config.task).eval]
    records = read_records(maft / "iter_0" / "debate_eval")
    assert saved["answer_freq_kl"] == pytest.approx(diversity.answer_kl(records, task.equivalent, 0.5, ids))
    assert saved["embedding_dissimilarity"] == pytest.approx(
        diversity.embedding_dissimilarity(records, diversity.load_encoder(), ids), abs=1e-5)
    convs, completions, keys = diversity.nll_requests(records, ids[:3])
    local = diversity.summarize_nll(HFEngine(testbed_mini).score(convs, completions), keys)
    assert saved["base_nll"] == pytest.approx(local["nll"], rel=1e-4)
    assert details["base_nll"]["nll_responses"] == local["nll_responses"] > 0
    # Iteration 0: critic 0 is the base model too, scoring critics 1 and 2 only.
    critics = {k: v for k, v in local["nll_by_agent"].items() if k != "0"}
    assert details["critic_nll"]["nll_by_agent"] == pytest.approx(critics, rel=1e-4)
    assert details["critic_nll"]["model"] == details["base_nll"]["model"]


def test_rerun_reuses_diversity_without_rewriting(runs, testbed_mini):
    from jobs.evaluate import main as evaluate

    maft = runs["maft"]
    cached = maft / "iter_0" / "diversity.json"
    stamp = cached.stat().st_mtime_ns
    saved = json.loads((maft / "metrics.json").read_text())
    again = evaluate(_config(maft, testbed_mini))
    assert again == runs["first"]
    assert cached.stat().st_mtime_ns == stamp
    merged = json.loads((maft / "metrics.json").read_text())
    assert [e["iteration"] for e in merged["iterations"]] == [0, 1, 2]  # later entries kept
    assert merged["iterations"][1:] == saved["iterations"][1:]


def test_critic_nll_scores_the_other_critics_under_critic_0s_model(runs, testbed_mini, lively_model):
    from mft_ray.engines.hf import HFEngine
    from mft_ray.metrics import diversity
    from mft_ray.run.records import read_records

    saved = json.loads((runs["transfer"] / "iter_1" / "metrics.json").read_text())
    details = saved["diversity_details"]
    assert details["critic_nll"]["model"] == lively_model and details["base_nll"]["model"] == testbed_mini
    records = read_records(runs["transfer"] / "iter_1" / "debate_eval")
    ids = [pid for pid in dict.fromkeys(records.column("problem_id").to_pylist())][:3]
    convs, completions, keys = diversity.nll_requests(records, ids, agents=[1, 2])
    local = diversity.summarize_nll(HFEngine(lively_model).score(convs, completions), keys)
    assert saved["critic_nll"] == pytest.approx(local["nll"], rel=1e-4)
    assert set(details["critic_nll"]["nll_by_agent"]) == {"1", "2"}
    # Under another model than the base, the same responses score differently.
    assert abs(saved["critic_nll"] - saved["base_nll"]) > 1e-3


def test_transfer_run_records_its_origin(runs):
    transfer = json.loads((runs["transfer"] / "metrics.json").read_text())
    assert (transfer["task"], transfer["finetune_task"]) == ("gsm8k", "arithmetic")
    assert transfer["society_from"] == str(runs["maft"])
    assert [e["iteration"] for e in transfer["iterations"]] == [1]
    assert transfer["iterations"][0]["problems"] == 3
    assert (runs["transfer"] / "iter_1" / "debate_eval").is_dir()


def _grid(report: str) -> dict[str, list[str]]:
    section = report.split("## Table 1")[1].split("##")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| Method")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in rows)}


def test_report_writes_markdown_and_every_figure(runs, tmp_path):
    from jobs.report import main as report

    out = tmp_path / "out"
    result = report([runs["maft"], runs["saft"], runs["gsm8k"], runs["transfer"]], out)
    text = (out / "report.md").read_text()
    names = ("figure1_accuracy.png", "figure3_diversity.png", "figure4_accuracy_vs_diversity.png",
             "figure5_transfer.png")
    for name in names:
        assert (out / name).read_bytes()[:8] == PNG, name
        assert f"]({name})" in text
    assert sorted(p.name for p in result["figures"].values()) == sorted(names)

    grid = _grid(text)
    assert list(grid) == ["Base", "Majority", "Debate", "Single-agent FT", "Multiagent FT"]
    assert grid["Multiagent FT"] == ["**100.0 ± 0.0**", "–"]  # its final iteration, the best arithmetic figure
    assert grid["Single-agent FT"] == ["50.0 ± 20.0", "–"]
    assert [grid[m][1] for m in ("Base", "Majority", "Debate")] == ["20.0 ± 16.0", "30.0 ± 19.0", "**40.0 ± 20.0**"]
    zero = runs["first"]
    assert grid["Debate"][0].strip("*") == f"{100 * zero['accuracy']:.1f} ± {100 * zero['stderr']:.1f}"
    for row, cells in grid.items():  # bold exactly where the column's best is
        for col, cell in enumerate(cells):
            if cell != "–":
                best = max(float(c.strip("*").split(" ± ")[0]) for c in (v[col] for v in grid.values()) if c != "–")
                assert cell.startswith("**") == (float(cell.strip("*").split(" ± ")[0]) == best), (row, cell)
    # The transfer run is not in the grid but in Figure 5's table, with its origin.
    assert re.search(r"\| Arithmetic -> GSM8K \| Multiagent FT \(iter 1\) \| [\d.]+ ± [\d.]+ \| transfer \|", text)
    assert "| 2 | 100.0 ± 0.0 | 0.650 | 0.350 | 0.175 | 0.117 | 1.350 | 2.350 |" in text  # maft's per-run table


def test_single_run_report_goes_under_the_run(runs):
    from jobs.report import main as report

    result = report([runs["saft"]])
    assert result["report"] == runs["saft"] / "report" / "report.md"
    text = result["report"].read_text()
    assert "No transfer run given, so no Figure 5." in text
    assert not (runs["saft"] / "report" / "figure5_transfer.png").exists()
    assert (runs["saft"] / "report" / "figure1_accuracy.png").read_bytes()[:8] == PNG


def test_report_bad_input_exits_2_naming_the_path(runs, tmp_path, capsys):
    from jobs.common import run_cli
    from jobs.report import cli

    missing = tmp_path / "nope"
    assert run_cli(cli, ["--run-dir", str(missing)]) == 2
    assert f"no such run directory: {missing}" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(cli, ["--run-dir", str(empty)]) == 2
    assert f"{empty / 'metrics.json'} is missing" in capsys.readouterr().err
    broken = shutil.copytree(runs["saft"], tmp_path / "broken", ignore=shutil.ignore_patterns("report"))
    (broken / "metrics.json").write_text("{not json")
    assert run_cli(cli, ["--run-dir", str(broken)]) == 2
    assert "metrics.json is not readable JSON" in capsys.readouterr().err
    assert run_cli(cli, ["--run-dir", str(runs["saft"]), "--run-dir", str(runs["maft"])]) == 2
    assert "--out is required with several --run-dir" in capsys.readouterr().err


def test_society_from_bad_input_exits_2(runs, tmp_path, capsys):
    from jobs.common import run_cli
    from jobs.evaluate import cli

    base = ["--config", str(REPO / "jobs/configs/iterate_cpu.yaml"), f"run_dir={tmp_path / 'new'}"]
    assert run_cli(cli, [*base, "--society-from", str(tmp_path / "nope"), "--iteration", "1"]) == 2
    assert f"--society-from: no such run directory: {tmp_path / 'nope'}" in capsys.readouterr().err
    assert run_cli(cli, [*base, "--society-from", str(runs["maft"]), "--iteration", "2"]) == 2
    assert "society 2 of" in capsys.readouterr().err
    assert run_cli(cli, [*base, "debate.agents=2", "--society-from", str(runs["maft"]), "--iteration", "1"]) == 2
    assert "debate.agents=3, this config debate.agents=2" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
