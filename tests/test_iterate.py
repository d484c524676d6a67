"""Integration: `jobs.iterate` end to end on real Ray + Ray Train + DeepSpeed (CPU, gloo).

The mini testbed (jobs/configs/iterate_cpu.yaml) runs 2 iterations with 3 agents and 2 rounds on a
few dozen problems.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mft_ray.config import load_config
from tests.conftest import REPO

pytestmark = pytest.mark.integration

OVERRIDES = ["task.finetune_size=24", "task.eval_size=12", "debate.shard_size=12"]


def _config(run_dir: Path, model: str):
    return load_config(REPO / "jobs/configs/iterate_cpu.yaml", [*OVERRIDES, f"run_dir={run_dir}", f"model.path={model}"])


def _params(path: str):
    from transformers import AutoModelForCausalLM

    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def _differs(a: dict, b: dict) -> bool:
    return any((a[k] - b[k]).abs().max().item() > 0 for k in a)


@pytest.fixture(scope="module")
def full_run(ray_cluster, testbed_mini, tmp_path_factory):
    from jobs.iterate import main

    run_dir = tmp_path_factory.mktemp("iterate") / "run"
    summary = main(_config(run_dir, testbed_mini))
    return run_dir, summary


def test_two_iterations_produce_metrics_datasets_and_checkpoints(full_run, testbed_mini):
    run_dir, summary = full_run
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert [e["iteration"] for e in saved["iterations"]] == [0, 1, 2]
    for entry in saved["iterations"]:
        assert 0 <= entry["accuracy"] <= 1 and entry["stderr"] >= 0 and 0 <= entry["consensus"] <= 1
        assert entry["problems"] == 12
    for it in (1, 2):
        counts = saved["iterations"][it]["datasets"]
        assert sum(counts[f"agent_{n}"]["generator"] for n in range(3)) > 0
        society = json.loads((run_dir / f"iter_{it}" / "society.json").read_text())
        assert set(society) == {f"{r}_{n}" for r in ("generator", "critic") for n in range(3)}
    # Every finetuned agent: checkpoint reloads, differs from its parent, and its loss fell.
    base = _params(testbed_mini)
    trained = 0
    for it in (1, 2):
        finetunes = json.loads((run_dir / f"iter_{it}" / "finetunes.json").read_text())
        for name, m in finetunes.items():
            ckpt = run_dir / f"iter_{it}" / name
            assert (ckpt / "config.json").is_file() and (ckpt / "train_metrics.json").is_file()
            parent = base if it == 1 else _params(json.loads((run_dir / "iter_1" / "society.json").read_text())[name])
            assert _differs(_params(str(ckpt)), parent), f"{ckpt} equals its parent"
            assert m["loss_after"] < m["loss_before"], f"{name} iter {it}: loss did not fall: {m}"
            trained += 1
    assert trained >= 6
    assert not list(run_dir.rglob("*.partial")) and not list(run_dir.rglob("*.tmp"))


def test_rerun_skips_every_finished_stage(full_run, testbed_mini):
    from jobs.iterate import main

    run_dir, first = full_run
    stamps = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and "ray_train" not in p.parts}
    start = time.time()
    again = main(_config(run_dir, testbed_mini))
    assert time.time() - start < 60
    assert [e["accuracy"] for e in again["iterations"]] == [e["accuracy"] for e in first["iterations"]]
    for p, t in stamps.items():
        if p.name not in ("metrics.json", "config.yaml"):
            assert p.stat().st_mtime_ns == t, f"{p} was rewritten on resume"


def test_killed_job_resumes_to_the_same_result(full_run, testbed_mini, tmp_path):
    """SIGKILL the job driver mid-finetune, rerun the same command: same final metrics and weights."""
    run_dir, first = full_run
    resumed = tmp_path / "run"
    cmd = [sys.executable, "-m", "jobs.iterate", "--config", "jobs/configs/iterate_cpu.yaml", *OVERRIDES,
           f"run_dir={resumed}", f"model.path={testbed_mini}"]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 400
    marker = resumed / "iter_1" / "datasets" / "counts.json"
    while time.time() < deadline and not marker.exists() and proc.poll() is None:
        time.sleep(0.5)
    assert marker.exists(), "the job never reached the finetuning stage"
    time.sleep(3)  # into the finetunes
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (resumed / "metrics.json").exists() or len(json.loads((resumed / "metrics.json").read_text())["iterations"]) < 3
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    final = json.loads((resumed / "metrics.json").read_text())
    assert [(e["accuracy"], e["consensus"]) for e in final["iterations"]] == \
        [(e["accuracy"], e["consensus"]) for e in first["iterations"]]
    for name in ("generator_0", "critic_2"):
        assert not _differs(_params(str(resumed / "iter_2" / name)), _params(str(run_dir / "iter_2" / name)))
