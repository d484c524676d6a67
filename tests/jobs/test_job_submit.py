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

from tests.conftest import REPO, kill_session, own_agent_ports

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
           "--disable-usage-stats", "--include-dashboard=true", *own_agent_ports()]
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
    kill_session(proc.pid)  # nothing here needs a graceful stop (SIGTERM took ~30 s)
    proc.wait()
    shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(cmd: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    """`ray job submit`, again while the head's job agent is still starting (it answers `ray job list`
    before it takes jobs: 'No available agent to submit job'; nothing was submitted then)."""
    deadline = time.time() + 120
    while True:
        done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if "No available agent to submit job" not in done.stdout + done.stderr or time.time() > deadline:
            return done
        time.sleep(3)


def test_job_submit_debate_writes_records(ray_head, tiny_model, tmp_path):
    address, env = ray_head
    run_dir = tmp_path / "run"
    cmd = ["ray", "job", "submit", "--address", address, "--working-dir", ".", "--",
           "python", "-m", "jobs.debate", "--config", "jobs/configs/tiny_cpu.yaml",
           f"run_dir={run_dir}", f"model.path={tiny_model}", "task.finetune_size=12",
           "task.eval_size=4", "debate.shard_size=6", "sampling.max_new_tokens=8"]
    done = _submit(cmd, env, timeout=300)
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
    done = _submit(cmd, env, timeout=120)
    assert done.returncode != 0
    assert "debate.agents must be >= 1" in done.stdout + done.stderr


def test_job_submit_iterate_runs_one_iteration_of_the_real_model_on_vllm(ray_head, tmp_path):
    """A whole iteration of the shipped real-model config under `ray job submit`: SmolLM2-135M-Instruct on
    the vLLM engine debates, its agents are finetuned by Ray Train on their own sets, and the finetuned
    checkpoints load back into vLLM engines for the evaluation debate. One agent and 4 problems per split
    (the job's path is the same as with 3 agents and 200)."""
    import json

    from mft_ray.run.records import read_records

    address, env = ray_head
    run_dir = tmp_path / "run"
    cmd = ["ray", "job", "submit", "--address", address, "--working-dir", ".", "--",
           "python", "-m", "jobs.iterate", "--config", "jobs/configs/smollm2_cpu.yaml",
           f"run_dir={run_dir}", "task.finetune_size=4", "task.eval_size=4", "debate.shard_size=4",
           "debate.agents=1", "sampling.max_new_tokens=48", "finetune.iterations=1",
           "finetune.generator.epochs=1", "finetune.critic.epochs=1", "finetune.generator.max_length=384",
           "finetune.critic.max_length=768", "model.max_model_len=1024", "model.kv_cache_gb=0.25",
           "metrics.embedding=false", "metrics.nll_problems=0"]
    # ~400 s alone on 2 cores; more than twice that when another Ray Train test shares the cores (make test's
    # second worker): the limit only catches a hang.
    done = _submit(cmd, env, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert [e["iteration"] for e in summary["iterations"]] == [0, 1]
    society = json.loads((run_dir / "iter_1" / "society.json").read_text())
    finetuned = [m for m, p in society.items() if p == str(run_dir / "iter_1" / m)]
    # Which members have a set depends on the sampled replies (a generator's set is its round-1 replies that
    # agree with the debate's final answer, which its critic may change): at least one was finetuned.
    assert finetuned, society
    finetunes = json.loads((run_dir / "iter_1" / "finetunes.json").read_text())
    for member in finetuned:
        assert (run_dir / "iter_1" / member / "model.safetensors").is_file()
        assert finetunes[member]["loss_after"] < finetunes[member]["loss_before"], finetunes[member]
    # The finetuned society answered with the real model's chat replies, read by the answer rules.
    records = read_records(run_dir / "iter_1" / "debate_eval").to_pylist()
    assert len({r["problem_id"] for r in records}) == 4
    assert all(r["response"].strip() for r in records)
    assert any(r["answer_rule"] is not None for r in records)
