"""Integration: `jobs.iterate` end to end on real Ray + Ray Train + DeepSpeed (CPU, gloo).

The mini testbed (jobs/configs/iterate_cpu.yaml) runs 1 iteration with 3 agents and 2 rounds on a few
dozen problems.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mft_ray.config import load_config
from tests.conftest import REPO, kill_session

pytestmark = pytest.mark.integration

# Diversity metrics are tested in tests/metrics and tests/reports; here they would only add an encoder load
# and a scorer actor to every evaluation.
# One iteration: iteration 2 differs only in where the finetunes start and their learning rate, tested with a
# fake runtime in tests/methods (test_iteration_two_...); the Ray run of it is in make demo and faults.py.
OVERRIDES = ["task.finetune_size=24", "task.eval_size=12", "debate.shard_size=12", "metrics.embedding=false",
             "metrics.nll_problems=0", "finetune.iterations=1"]


def _config(run_dir: Path, model: str):
    return load_config(REPO / "jobs/configs/iterate_cpu.yaml", [*OVERRIDES, f"run_dir={run_dir}", f"model.path={model}"])


def _params(path: str):
    from transformers import AutoModelForCausalLM

    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def _differs(a: dict, b: dict) -> bool:
    return any((a[k] - b[k]).abs().max().item() > 0 for k in a)


@pytest.fixture(scope="module")
def full_run(ray_cluster, testbed_mini, tmp_path_factory):
    """The uninterrupted run: its directory, its summary, and the names of the societies it placed."""
    import actors.runtime
    from jobs.iterate import main

    placed = []

    class Recorded(actors.runtime.SocietyGroup):
        def __init__(self, *args, **kwargs) -> None:
            placed.append(kwargs["name"])
            super().__init__(*args, **kwargs)

    run_dir = tmp_path_factory.mktemp("iterate") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(actors.runtime, "SocietyGroup", Recorded)
        summary = main(_config(run_dir, testbed_mini))
    return run_dir, summary, placed


def test_an_iteration_produces_metrics_datasets_and_checkpoints(full_run, testbed_mini):
    run_dir, _, placed = full_run
    # Society 0 is placed once: it evaluates, then debates the finetune split; then the finetunes take the CPUs.
    assert placed == ["society-iter0-eval", "society-iter1-eval"], placed
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert [e["iteration"] for e in saved["iterations"]] == [0, 1]
    for entry in saved["iterations"]:
        assert 0 <= entry["accuracy"] <= 1 and entry["stderr"] >= 0 and 0 <= entry["consensus"] <= 1
        assert entry["problems"] == 12
    for it in (1,):
        counts = saved["iterations"][it]["datasets"]
        assert sum(counts[f"agent_{n}"]["generator"] for n in range(3)) > 0
        society = json.loads((run_dir / f"iter_{it}" / "society.json").read_text())
        assert set(society) == {f"{r}_{n}" for r in ("generator", "critic") for n in range(3)}
    # Every finetuned agent: checkpoint reloads, differs from its parent, and its loss fell.
    base = _params(testbed_mini)
    trained = 0
    for it in (1,):
        finetunes = json.loads((run_dir / f"iter_{it}" / "finetunes.json").read_text())
        for name, m in finetunes.items():
            ckpt = run_dir / f"iter_{it}" / name
            assert (ckpt / "config.json").is_file() and (ckpt / "train_metrics.json").is_file()
            assert _differs(_params(str(ckpt)), base), f"{ckpt} equals its parent"
            assert m["loss_after"] < m["loss_before"], f"{name} iter {it}: loss did not fall: {m}"
            trained += 1
    assert trained >= 3
    assert not list(run_dir.rglob("*.partial")) and not list(run_dir.rglob("*.tmp"))


def test_rerun_skips_every_finished_stage(full_run, testbed_mini):
    from jobs.iterate import main

    run_dir, first, _ = full_run
    stamps = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and "ray_train" not in p.parts}
    start = time.time()
    again = main(_config(run_dir, testbed_mini))
    assert time.time() - start < 60
    assert [e["accuracy"] for e in again["iterations"]] == [e["accuracy"] for e in first["iterations"]]
    for p, t in stamps.items():
        if p.name not in ("metrics.json", "config.yaml"):
            assert p.stat().st_mtime_ns == t, f"{p} was rewritten on resume"


def _registered_checkpoints(iteration_dir: Path) -> set[str]:
    """The finetunes of this iteration whose training state is Ray Train's latest registered checkpoint of a
    run (of the lane training it)."""
    from actors.finetune import checkpointed_runs

    return set(checkpointed_runs(str(iteration_dir / "ray_train")))


def _resumable_finetunes(iteration_dir: Path) -> set[str]:
    """Finetunes a rerun must resume: a registered checkpoint and no export yet (a finetune can also
    finish between its checkpoint and the kill, and then has nothing left to resume)."""
    return {name for name in _registered_checkpoints(iteration_dir)
            if not (iteration_dir / name / "config.json").exists()}


def _shard_written(directory: Path, index: int = 0) -> bool:
    return (directory / f"shard_{index:05d}.parquet").exists()


# (what the kill interrupts, when to kill: a predicate on the run directory, then a delay in seconds), in
# the order of the run's stages. The test kills at the one that needs Ray Train's own resume; all of them
# run in benchmarks/faults.py (each predicate is awaited on the resumed run).
FINETUNE_KILL = ("iteration-1 finetunes, after a Ray Train checkpoint",
                 lambda r: bool(_registered_checkpoints(r / "iter_1")), 0.0)
ALL_KILL_POINTS = [
    ("iteration-0 finetune-split debate, between shards",
     lambda r: _shard_written(r / "iter_0" / "debate_finetune"), 0.0),
    ("just after the iteration-1 datasets, as the finetunes start",
     lambda r: (r / "iter_1" / "datasets" / "counts.json").exists(), 0.0),
    FINETUNE_KILL,
    ("iteration-1 evaluation debate",
     lambda r: (r / "iter_1" / "society.json").exists(), 2.0),
    ("iteration-2 finetune-split debate by the finetuned society, between shards",
     lambda r: _shard_written(r / "iter_1" / "debate_finetune"), 0.0),
]


def _assert_nothing_half_written(run: Path) -> None:
    """Whatever a killed driver left looks complete only if it is: shards read, checkpoints are whole."""
    from mft_ray.run.files import read_sealed_json
    from mft_ray.run.records import read_records
    from mft_ray.run.rundir import RunDir
    from mft_ray.training.export import checkpoint_problem

    for d in run.glob("iter_*/debate_*"):
        if list(d.glob("shard_*.parquet")):
            read_records(d)
    for it_dir in run.glob("iter_*"):
        it = int(it_dir.name.split("_")[1])
        if (it_dir / "datasets" / "counts.json").exists():
            assert read_sealed_json(it_dir / "datasets" / "counts.json") is not None
        for ckpt in it_dir.glob("*_*"):  # (a hidden .<name>.partial export may be half-written: by design)
            if not ckpt.name.startswith(".") and ckpt.is_dir() and (ckpt / "config.json").exists():
                assert checkpoint_problem(ckpt) is None, ckpt
        if (it_dir / "society.json").exists():
            assert RunDir(run).read_society(it) is not None


def _unfinished_copy(run_dir: Path, dest: Path, redo: tuple[str, ...]) -> None:
    """``dest``: the finished run ``run_dir`` as it stood while iteration 1 finetuned the agents ``redo``
    (the other finetunes exported, iteration 1's evaluation and everything after it not yet run)."""
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("iter_2", "ray_train"))
    it1 = dest / "iter_1"
    for name in (*redo, "society.json", "finetunes.json", "metrics.json", "diversity.json", "debate_eval",
                 "debate_finetune"):
        path = it1 / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    for name in ("metrics.json", "results.md", "accuracy.png"):
        (dest / name).unlink(missing_ok=True)


def test_driver_killed_mid_finetune_resumes_to_the_same_result(full_run, ray_cluster, testbed_mini, tmp_path):
    """SIGKILL the job driver (and its local Ray) while two of iteration 1's finetunes train (one lane), after
    the first Ray Train checkpoint, then rerun the same command: the rerun keeps the finished finetunes, resumes
    the killed one from its checkpoint, and ends with the uninterrupted run's metrics and weights.

    The run starts from a copy of the uninterrupted run's directory with two finetunes and everything after
    them removed (so only they train). Kills at every other stage of a 2-iteration run are in
    benchmarks/faults.py."""
    run_dir, first, _ = full_run
    resumed = tmp_path / "run"
    redo = ("generator_0", "critic_0")
    _unfinished_copy(run_dir, resumed, redo)
    kept = {p: p.stat().st_mtime_ns for p in resumed.rglob("*")
            if p.is_file() and p.parent.name in ("generator_1", "critic_2")}
    # One lane: the two finetunes train one after another in one Ray Train run, killed in the first; the rerun
    # resumes it in the run that holds its checkpoint (actors.finetune.plan_lanes), then trains the other.
    cmd = [sys.executable, "-m", "jobs.iterate", "--config", "jobs/configs/iterate_cpu.yaml", *OVERRIDES,
           f"run_dir={resumed}", f"model.path={testbed_mini}", "finetune.max_concurrent=1"]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    what, ready, delay = FINETUNE_KILL
    log = tmp_path / "killed_job.log"  # the killed job's own output, for a failure message
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 900  # a hang guard: the job's local Ray may need several starts under load
    while time.time() < deadline and not ready(resumed) and proc.poll() is None:
        time.sleep(0.1)
    assert ready(resumed), \
        f"the job never reached the kill point: {what} (exit code {proc.poll()}):\n{log.read_text()[-3000:]}"
    time.sleep(delay)
    assert proc.poll() is None, f"the job ended before the kill point: {what}"
    kill_session(proc.pid)  # the driver, its local Ray and every worker, before looking at what is left
    proc.wait()
    resumable = _resumable_finetunes(resumed / "iter_1")
    assert resumable and resumable <= set(redo), resumable
    summary = resumed / "metrics.json"  # iteration 0's entry at most
    assert not summary.exists() or len(json.loads(summary.read_text())["iterations"]) < 2
    _assert_nothing_half_written(resumed)
    # The rerun joins this module's Ray (the killed run's local one is gone): one Ray start fewer on 2 cores.
    env["RAY_ADDRESS"] = ray_cluster.get_runtime_context().gcs_address
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    final = json.loads((resumed / "metrics.json").read_text())
    assert [(e["accuracy"], e["consensus"]) for e in final["iterations"]] == \
        [(e["accuracy"], e["consensus"]) for e in first["iterations"]]
    finetunes = json.loads((resumed / "iter_1" / "finetunes.json").read_text())
    for name in resumable:  # resumed from the checkpoint the kill left, not started over
        assert finetunes[name].get("resumed_after_micro_batches"), (name, finetunes[name])
    for p, t in kept.items():
        assert p.stat().st_mtime_ns == t, f"{p}: a finished finetune was redone"
    society = json.loads((run_dir / "iter_1" / "society.json").read_text())
    again = json.loads((resumed / "iter_1" / "society.json").read_text())
    assert again.keys() == society.keys()
    for name in redo:
        assert not _differs(_params(again[name]), _params(society[name])), \
            f"iteration 1 {name} differs from the uninterrupted run's"
