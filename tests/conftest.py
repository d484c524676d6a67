"""Shared fixtures: a tiny Llama built locally (nothing downloaded) and one Ray start per module."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

# Before anything starts Ray: no token auth (it breaks later CLI calls), no usage reporting.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One math thread per process (torch, and through the environment Ray's workers, Ray Train's and vLLM's). Two
# pytest workers share two cores, each with a driver and actors computing at once: with torch's default of a
# thread per core, every parallel op waits for a thread that another process has descheduled, and two
# processes side by side ran 5x slower than alone (a matmul loop: 25 s each instead of 5); with one thread
# each, 5 s each (docs/testing.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# Ray Train's controller polls its workers every 2 s and starts a preemption watcher (one more actor process)
# per run; the suite's runs train for seconds on one node that is never preempted. Polling every 0.5 s
# registers checkpoints and finished runs sooner; neither changes anything the tests check.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _live_members(session: int) -> list[int]:
    """Processes of ``session`` that are still running (zombies excluded: they are dead already)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) != session:
                continue
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            pids.append(int(entry))
    return pids


def kill_session(session: int, timeout: float = 60.0) -> None:
    """SIGKILL every process of a session started with ``start_new_session=True`` and wait until all are gone.

    A job driver's local Ray puts its workers (Ray Train workers included) in their own process groups, so
    ``os.killpg`` on the driver's group leaves them running for seconds, long enough to finish and export a
    finetune the test then counts as interrupted. Killing the whole session is the machine-crash case."""
    deadline = time.time() + timeout
    while True:
        live = _live_members(session)
        if not live:
            return
        if time.time() > deadline:
            raise TimeoutError(f"processes of session {session} still alive after {timeout:.0f} s: {live}")
        for pid in live:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_agent_ports() -> list[str]:
    """`ray start` flags giving a test's head its own agent ports. By default every local Ray instance's
    dashboard agent (which takes jobs) and runtime-env agent bind fixed ports, so next to another test
    worker's Ray the head's agent cannot start and `ray job submit` answers 'No available agent'."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A randomly initialised 2-layer Llama with a byte tokenizer and chat template, saved locally."""
    from mft_ray.models.tiny import build_tiny_llama

    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def testbed_mini() -> str:
    """The mini testbed (pretrained ~30 s on arithmetic debate turns): its answers parse and agree. Built once
    into the model cache ($MFT_CACHE_DIR), which parallel test workers share."""
    from mft_ray.models.builtin import resolve_model_path

    return resolve_model_path("builtin:testbed-mini")


@pytest.fixture(scope="session")
def lively_model(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny Llama with larger random weights.

    With its default init (std 0.02, tied embeddings) the tiny model greedily repeats the
    ``<|assistant|>`` special token, so every greedy text decodes to "" and comparing texts would prove
    nothing. Larger weights make each prompt give a distinct, non-empty greedy continuation.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    out = tmp_path_factory.mktemp("lively-llama")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray instance with 2 CPUs, started once per test module."""
    import ray

    from actors.runtime import start_local_ray

    start_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# Which worker ran which test file, and when: `make test` appends one JSON line per test file to
# $MFT_CACHE_DIR/test_timeline.jsonl, to see which heavy files ran at the same time (they share 2 cores).
_FILE_STARTS: dict[str, float] = {}


def pytest_runtest_logstart(nodeid: str, location: tuple) -> None:
    _FILE_STARTS.setdefault(nodeid.split("::")[0], time.time())


def pytest_runtest_logfinish(nodeid: str, location: tuple) -> None:
    path = nodeid.split("::")[0]
    if path not in _FILE_STARTS or not os.environ.get("MFT_CACHE_DIR"):
        return
    record = {"file": path, "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
              "start": _FILE_STARTS[path], "end": time.time()}
    timeline = Path(os.environ["MFT_CACHE_DIR"]) / "test_timeline.jsonl"
    timeline.parent.mkdir(parents=True, exist_ok=True)
    with timeline.open("a") as f:  # one line per test: the last line of a file holds its end
        f.write(json.dumps(record) + "\n")


def random_adapters(base: str, out: Path, n: int, rank: int = 8, scale: float = 0.05) -> list[str]:
    """``n`` PEFT LoRA adapters of ``base`` in ``out`` with random (nonzero) B matrices, so that each one
    changes the model (a new adapter's B is zero: it would equal the base)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(n):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)
        model.save_pretrained(out / f"agent_{i}")
        paths.append(str(out / f"agent_{i}"))
    return paths
