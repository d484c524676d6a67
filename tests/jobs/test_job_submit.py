"""`ray job submit` of the debate job against a real local head bound to 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` in its own temp dir and process group; torn down after the module."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", RAY_AUTH_MODE="disabled")
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's socket paths have a length limit
    dash = _free_port()
    cmd = [shutil.which("ray", path=env["PATH"]), "start", "--head", "--block", "--num-cpus=2",
           f"--port={_free_port()}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--ray-client-server-port={_free_port()}", f"--temp-dir={temp_dir}",
           "--disable-usage-stats", "--include-dashboard=true"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 90
    while time.time() < deadline:
        probe = subprocess.run([shutil.which("ray", path=env["PATH"]), "job", "list", "--address", address],
                               env=env, capture_output=True, text=True)
        if probe.returncode == 0:
            break
        assert proc.poll() is None, "ray start --head exited early"
        time.sleep(2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the local Ray head's job server did not come up within 90 s")
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_submit_debate_writes_records(ray_head, tiny_model, tmp_path):
    address, env = ray_head
    run_dir = tmp_path / "run"
    cmd = ["ray", "job", "submit", "--address", address, "--working-dir", ".", "--",
           "python", "-m", "jobs.debate", "--config", "jobs/configs/tiny_cpu.yaml",
           f"run_dir={run_dir}", f"model.path={tiny_model}", "task.finetune_size=12",
           "task.eval_size=4", "debate.shard_size=6", "sampling.max_new_tokens=8"]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout + done.stderr

    import pyarrow.parquet as pq

    shards = sorted((run_dir / "iter_0" / "debate_finetune").glob("shard_*.parquet"))
    assert [s.name for s in shards] == ["shard_00000.parquet", "shard_00001.parquet"]
    rows = sum(pq.read_metadata(s).num_rows for s in shards)
    assert rows == 12 * (3 + 3 + 3)  # per problem: 3 generators, 3 summaries, 3 critics
    assert (run_dir / "config.yaml").is_file()
    assert not list(run_dir.rglob("*.tmp"))


def test_job_submit_bad_config_fails_clearly(ray_head):
    address, env = ray_head
    cmd = ["ray", "job", "submit", "--address", address, "--working-dir", ".", "--",
           "python", "-m", "jobs.debate", "--config", "jobs/configs/tiny_cpu.yaml", "debate.agents=0"]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "debate.agents must be >= 1" in done.stdout + done.stderr


def test_job_submit_iterate_runs_one_iteration(ray_head, testbed_mini, tmp_path):
    import json

    address, env = ray_head
    run_dir = tmp_path / "run"
    cmd = ["ray", "job", "submit", "--address", address, "--working-dir", ".", "--",
           "python", "-m", "jobs.iterate", "--config", "jobs/configs/iterate_cpu.yaml",
           f"run_dir={run_dir}", f"model.path={testbed_mini}", "task.finetune_size=12", "task.eval_size=6",
           "finetune.iterations=1", "finetune.generator.epochs=1", "finetune.critic.epochs=1",
           # One agent (2 finetunes, not 6) and no diversity metrics: the job's path is the same, in half the time.
           "debate.agents=1", "metrics.embedding=false", "metrics.nll_problems=0"]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert [e["iteration"] for e in summary["iterations"]] == [0, 1]
    society = json.loads((run_dir / "iter_1" / "society.json").read_text())
    finetuned = [m for m, p in society.items() if p == str(run_dir / "iter_1" / m)]
    assert finetuned, "no agent was finetuned"
    for member in finetuned:
        assert (run_dir / "iter_1" / member / "config.json").is_file()
