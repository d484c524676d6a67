"""The OpenAI-compatible engine against a real HTTP server on 127.0.0.1 serving the tiny Llama, its
error and retry paths, its config, and the export of per-agent sets for API finetuning."""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

import pytest

from mft_ray.config import ModelConfig, load_config
from mft_ray.engines import SamplingParams
from mft_ray.engines.factory import make_engine
from mft_ray.engines.openai_compat import OpenAIEngine, _retry_after
from mft_ray.errors import ConfigError, EngineError
from tests.openai_server import Fault, OpenAITestServer

GREEDY = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=8, seed=0)
MODEL = "tiny-llama"
KEY = "sk-test-PLANTED-0123456789abcdef"  # a fake key that must never show up in errors or logs

CONVERSATIONS = [
    [{"role": "user", "content": "x" * 120}],
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "Are you sure? " * 6}],
    [{"role": "user", "content": "a"}],
    [{"role": "user", "content": "What is the result of 3+4*5+6-7*8?"}],
    [{"role": "user", "content": "Tell me a story about " + "z" * 40}],
]


@pytest.fixture(scope="module")
def hf_engine(lively_model: str):
    """The HF engine the test server serves (the tiny Llama with lively weights, see conftest)."""
    from mft_ray.engines.hf import HFEngine

    engine = HFEngine(lively_model, dtype="float32", device="cpu")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def reference(hf_engine) -> list[str]:
    """What the HF engine itself replies greedily, one conversation at a time (as the server does)."""
    return [hf_engine.generate([c], GREEDY)[0] for c in CONVERSATIONS]


@pytest.fixture(scope="module")
def server_module(hf_engine):
    with OpenAITestServer(hf_engine, model_name=MODEL) as srv:
        yield srv


@pytest.fixture
def server(server_module: OpenAITestServer) -> OpenAITestServer:
    server_module.reset()
    return server_module


def engine_for(url: str, **kw) -> OpenAIEngine:
    kw.setdefault("timeout_s", 10.0)
    kw.setdefault("max_retries", 3)
    kw.setdefault("backoff_s", 0.01)
    return OpenAIEngine(MODEL, url, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- generation --------------------------------------------------------------------------------------


def test_greedy_output_matches_hf_engine_in_order_with_concurrency(server, reference) -> None:
    assert len(set(reference)) == len(reference) and all(reference)  # the comparison means something
    index = {json.dumps(c): i for i, c in enumerate(CONVERSATIONS)}
    # Earlier conversations wait longer, so replies arrive in reverse order.
    server.delay_s = lambda body: 0.08 * (len(CONVERSATIONS) - index[json.dumps(body["messages"])])
    engine = engine_for(server.base_url, max_concurrency=4)
    try:
        assert engine.generate(CONVERSATIONS, GREEDY) == reference
    finally:
        engine.close()
    assert 1 < server.max_in_flight <= 4
    bodies = [r["body"] for r in server.requests]
    assert len(bodies) == len(CONVERSATIONS)
    assert all(r["path"] == "/v1/chat/completions" and r["authorization"] is None for r in server.requests)
    for body in bodies:
        assert body["model"] == MODEL and body["n"] == 1 and body["max_tokens"] == 8
        assert body["temperature"] == 0.0 and body["top_p"] == 1.0
    # Each request is seeded by its position: equal prompts in one batch must not get equal samples.
    assert len({b["seed"] for b in bodies}) == len(bodies)
    assert engine.usage["requests"] == len(CONVERSATIONS)
    assert engine.generate([], GREEDY) == []


def test_concurrency_limit_is_respected(server) -> None:
    server.delay_s = lambda body: 0.15
    engine = engine_for(server.base_url, max_concurrency=2)
    try:
        out = engine.generate(CONVERSATIONS, SamplingParams(temperature=1.0, max_new_tokens=4, seed=3))
    finally:
        engine.close()
    assert len(out) == len(CONVERSATIONS)
    assert server.max_in_flight == 2


def test_make_engine_builds_openai_engine_from_config(server, reference) -> None:
    cfg = ModelConfig(engine="openai", path=MODEL, base_url=server.base_url, max_concurrency=3,
                      request_timeout_s=5.0, max_retries=1, retry_backoff_s=0.01)
    cfg.validate()
    engine = make_engine(cfg)
    try:
        assert isinstance(engine, OpenAIEngine)
        assert (engine.model_path, engine.max_concurrency, engine.timeout_s, engine.max_retries) == (MODEL, 3, 5.0, 1)
        assert engine.generate(CONVERSATIONS[:2], GREEDY) == reference[:2]
    finally:
        engine.close()
    # An explicit path (a finetuned member's model) is the model name, passed through untouched.
    other = make_engine(cfg, path="ft:tiny-llama:agent-0")
    try:
        assert other.model_path == "ft:tiny-llama:agent-0"
        with pytest.raises(EngineError, match=r"HTTP 404.*ft:tiny-llama:agent-0` does not exist"):
            other.generate(CONVERSATIONS[:1], GREEDY)
    finally:
        other.close()


# -- retries and failures ------------------------------------------------------------------------------


@pytest.mark.parametrize("headers, wait_s", [({"Retry-After": "1"}, 1.0), ({"retry-after-ms": "400"}, 0.4)])
def test_429_is_retried_after_the_servers_retry_after(server, reference, headers, wait_s) -> None:
    server.faults.append(Fault(status=429, message="Rate limit reached", headers=headers))
    engine = engine_for(server.base_url, backoff_s=0.0)
    start = time.monotonic()
    try:
        assert engine.generate(CONVERSATIONS[:1], GREEDY) == reference[:1]
    finally:
        engine.close()
    assert time.monotonic() - start >= wait_s * 0.95
    assert len(server.requests) == 2


def test_5xx_is_retried_with_backoff(server, reference, caplog) -> None:
    server.faults.extend([Fault(status=503, message="overloaded"), Fault(status=502, message="bad gateway")])
    engine = engine_for(server.base_url, backoff_s=0.05)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="mft_ray.engines.openai_compat"):
        try:
            assert engine.generate(CONVERSATIONS[:1], GREEDY) == reference[:1]
        finally:
            engine.close()
    # Exponential with jitter in [0.5, 1]: at least 0.025 + 0.05 s in all.
    assert time.monotonic() - start >= 0.07
    assert len(server.requests) == 3
    assert "HTTP 503" in caplog.text and "overloaded" in caplog.text and "retrying" in caplog.text


def test_400_fails_at_once_with_the_server_message(server) -> None:
    server.faults.append(Fault(status=400, message="max_tokens is too large: 99999"))
    engine = engine_for(server.base_url, max_retries=5, max_concurrency=1)
    try:
        with pytest.raises(EngineError, match=r"HTTP 400.*max_tokens is too large: 99999") as err:
            engine.generate(CONVERSATIONS, GREEDY)
    finally:
        engine.close()
    assert server.base_url in str(err.value)
    # The failure stops the batch: the queued requests are dropped (one may already have started).
    assert len(server.requests) <= 2


def test_a_redirect_is_not_followed(server, monkeypatch) -> None:
    # Followed, a redirected POST could lose its body or carry the key to another host.
    monkeypatch.setenv("MFT_TEST_OPENAI_KEY", KEY)
    server.faults.append(Fault(status=307, message="moved", headers={"Location": "http://127.0.0.2:9/v1/x"}))
    engine = engine_for(server.base_url, api_key_env="MFT_TEST_OPENAI_KEY")
    try:
        with pytest.raises(EngineError, match=r"HTTP 307.*redirects are not followed") as err:
            engine.generate(CONVERSATIONS[:1], GREEDY)
    finally:
        engine.close()
    assert len(server.requests) == 1 and KEY not in str(err.value)


def test_retries_exhausted_names_url_and_last_error(server) -> None:
    server.faults.extend([Fault(status=500, message="boom")] * 3)
    engine = engine_for(server.base_url, max_retries=2)
    try:
        with pytest.raises(EngineError, match=r"failed after 3 attempt\(s\); last error: HTTP 500 .*boom") as err:
            engine.generate(CONVERSATIONS[:1], GREEDY)
    finally:
        engine.close()
    assert f"{server.base_url}/chat/completions" in str(err.value)
    assert len(server.requests) == 3


def test_a_timed_out_request_is_retried(server, reference) -> None:
    server.faults.append(Fault(sleep_s=1.5))  # stalls past the client's timeout, once
    engine = engine_for(server.base_url, timeout_s=0.4, max_retries=1)
    start = time.monotonic()
    try:
        assert engine.generate(CONVERSATIONS[:1], GREEDY) == reference[:1]
    finally:
        engine.close()
    assert time.monotonic() - start < 1.4
    assert len(server.requests) == 2


def test_timeouts_exhausted_fail_in_bounded_time(server) -> None:
    server.faults.extend([Fault(sleep_s=1.0)] * 2)
    engine = engine_for(server.base_url, timeout_s=0.3, max_retries=1)
    start = time.monotonic()
    try:
        with pytest.raises(EngineError, match=r"failed after 2 attempt\(s\); last error: timed out after 0.3s"):
            engine.generate(CONVERSATIONS[:1], GREEDY)
    finally:
        engine.close()
    assert time.monotonic() - start < 1.5


def test_unreachable_port_fails_quickly() -> None:
    port = free_port()  # nothing listens there any more
    engine = engine_for(f"http://127.0.0.1:{port}/v1", timeout_s=2.0, max_retries=2, backoff_s=0.05)
    start = time.monotonic()
    try:
        with pytest.raises(EngineError, match=rf"127\.0\.0\.1:{port}/v1/chat/completions failed after 3 "
                                              r"attempt\(s\); last error: .*[Rr]efused"):
            engine.generate(CONVERSATIONS[:2], GREEDY)
    finally:
        engine.close()
    assert time.monotonic() - start < 3.0


def test_silent_endpoint_never_hangs() -> None:
    # Listens (the kernel completes the handshake) but never answers: only the timeout ends a request.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        engine = engine_for(url, timeout_s=0.3, max_retries=1)
        start = time.monotonic()
        try:
            with pytest.raises(EngineError, match="timed out after 0.3s"):
                engine.generate(CONVERSATIONS[:1], GREEDY)
        finally:
            engine.close()
    assert time.monotonic() - start < 2.0


def test_bad_base_url_is_refused() -> None:
    with pytest.raises(EngineError, match="http"):
        OpenAIEngine(MODEL, "ftp://127.0.0.1/v1")


def test_backoff_is_capped_and_retry_after_parsed() -> None:
    engine = OpenAIEngine(MODEL, "http://127.0.0.1:1/v1", backoff_s=1.0, max_backoff_s=5.0)
    try:
        assert all(2.5 <= engine._delay(10, None) <= 5.0 for _ in range(20))
        assert 0.5 <= engine._delay(0, None) <= 1.0
        assert engine._delay(0, 3600.0) == 5.0  # a huge Retry-After is capped, never an hour's hang
        assert engine._delay(0, 2.0) == 2.0
    finally:
        engine.close()
    import email.message
    import email.utils

    headers = email.message.Message()
    headers["Retry-After"] = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= _retry_after(headers) <= 31
    headers = email.message.Message()
    headers["Retry-After"] = "soon"
    assert _retry_after(headers) is None


# -- the API key ---------------------------------------------------------------------------------------


@pytest.fixture
def auth_server(hf_engine):
    with OpenAITestServer(hf_engine, model_name=MODEL, api_key=KEY) as srv:
        yield srv


def test_key_is_read_from_env_sent_as_bearer_and_never_leaked(auth_server, reference, monkeypatch,
                                                              caplog) -> None:
    monkeypatch.setenv("MFT_TEST_OPENAI_KEY", KEY)
    errors: list[str] = []
    with caplog.at_level(logging.DEBUG):
        engine = engine_for(auth_server.base_url, api_key_env="MFT_TEST_OPENAI_KEY", max_retries=1)
        try:
            assert engine.generate(CONVERSATIONS[:1], GREEDY) == reference[:1]
            assert auth_server.requests[-1]["authorization"] == f"Bearer {KEY}"
            # A server (or proxy) that echoes the Authorization header in its errors, retryable or not.
            auth_server.faults.extend([Fault(status=503, echo_authorization=True)] * 2)
            with pytest.raises(EngineError) as err:
                engine.generate(CONVERSATIONS[:1], GREEDY)
            errors.append(str(err.value))
            auth_server.faults.append(Fault(status=400, echo_authorization=True))
            with pytest.raises(EngineError) as err:
                engine.generate(CONVERSATIONS[:1], GREEDY)
            errors.append(str(err.value))
        finally:
            engine.close()
        # The wrong key: 401, and the message says where the key came from, not what it was.
        monkeypatch.setenv("MFT_TEST_OPENAI_KEY", KEY[::-1])
        wrong = engine_for(auth_server.base_url, api_key_env="MFT_TEST_OPENAI_KEY")
        try:
            with pytest.raises(EngineError, match=r"HTTP 401.*\$MFT_TEST_OPENAI_KEY: set\)") as err:
                wrong.generate(CONVERSATIONS[:1], GREEDY)
            errors.append(str(err.value))
        finally:
            wrong.close()
    assert all("[redacted]" in e for e in errors[:2])
    for text in (*errors, caplog.text):
        assert KEY not in text and KEY[::-1] not in text
    assert "key from $MFT_TEST_OPENAI_KEY: set" in caplog.text


def test_missing_key_sends_no_header_and_401_names_the_variable(auth_server, monkeypatch) -> None:
    monkeypatch.delenv("MFT_TEST_UNSET_KEY", raising=False)
    engine = engine_for(auth_server.base_url, api_key_env="MFT_TEST_UNSET_KEY")
    try:
        with pytest.raises(EngineError, match=r"HTTP 401.*Incorrect API key.*\$MFT_TEST_UNSET_KEY: not set"):
            engine.generate(CONVERSATIONS[:1], GREEDY)
    finally:
        engine.close()
    assert auth_server.requests[-1]["authorization"] is None
    assert len(auth_server.requests) == 1  # 401 is not retried


# -- config ----------------------------------------------------------------------------------------------


def test_config_accepts_an_openai_model_without_a_local_path() -> None:
    cfg = load_config(None, ["model.engine=openai", "model.path=gpt-3.5-turbo-0125",
                             "model.base_url=https://api.openai.com/v1", "model.max_concurrency=4"])
    assert (cfg.model.engine, cfg.model.path, cfg.model.api_key_env) == ("openai", "gpt-3.5-turbo-0125", "OPENAI_API_KEY")


@pytest.mark.parametrize("overrides, message", [
    ({"base_url": None}, r"model\.base_url is required for engine 'openai'"),
    ({"base_url": "ftp://host/v1"}, r"model\.base_url must be an http\(s\) URL, got 'ftp://host/v1'"),
    ({"base_url": "127.0.0.1:8000/v1"}, r"model\.base_url must be an http\(s\) URL"),
    ({"path": "builtin:tiny-random"}, r"model\.path must be the served model's name"),
    ({"path": ""}, r"model\.path must be the served model's name"),
    ({"request_timeout_s": 0.0}, r"model\.request_timeout_s must be > 0"),
    ({"max_retries": -1}, r"model\.max_retries must be >= 0"),
    ({"retry_backoff_s": -1.0}, r"model\.retry_backoff_s must be >= 0"),
    ({"max_concurrency": 0}, r"model\.max_concurrency must be >= 1"),
])
def test_config_rejects_bad_openai_settings(overrides, message) -> None:
    settings = {"engine": "openai", "path": "gpt-3.5-turbo", "base_url": "http://127.0.0.1:8000/v1", **overrides}
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**settings).validate()


def test_config_rejects_a_key_pasted_as_api_key_env_without_echoing_it() -> None:
    cfg = ModelConfig(engine="openai", path="gpt-3.5-turbo", base_url="https://api.openai.com/v1", api_key_env=KEY)
    with pytest.raises(ConfigError, match=r"model\.api_key_env must name an environment variable") as err:
        cfg.validate()
    assert KEY not in str(err.value)


def test_iterate_refuses_local_finetuning_of_a_served_model(tmp_path: Path) -> None:
    from jobs import iterate

    cfg = load_config(None, ["model.engine=openai", "model.path=gpt-3.5-turbo",
                             "model.base_url=http://127.0.0.1:8000/v1", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"finetune\.iterations must be 0 with model\.engine=openai"):
        iterate.main(cfg)
    assert not (tmp_path / "run").exists()  # refused before any work


# -- export for API finetuning ---------------------------------------------------------------------------


def _generator_example(pid: str, answer: str) -> dict:
    return {"problem_id": pid, "messages": [{"role": "user", "content": f"What is {pid}?"},
                                            {"role": "assistant", "content": answer}]}


def _critic_example(pid: str) -> dict:
    return {"problem_id": pid, "messages": [
        {"role": "user", "content": f"What is {pid}?"},
        {"role": "assistant", "content": "first try: 5", "weight": 0},
        {"role": "user", "content": "Here are other agents' answers. Update yours."},
        {"role": "assistant", "content": "The answer is 4."}]}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_export_sets_writes_openai_chat_jsonl(tmp_path: Path) -> None:
    from mft_ray.methods.openai_export import MANIFEST, export_sets

    out = tmp_path / "openai"
    out.mkdir()
    (out / "critic_1.jsonl").write_text("stale\n")  # from an earlier export; agent 1 now has no critic set
    sets = {"generator_0": [_generator_example(f"p{i}", "4") for i in range(12)],
            "critic_0": [_critic_example("p0"), _critic_example("p1")],
            "generator_1": [_generator_example("p3", "ünïcode ✓")], "critic_1": []}
    manifest = export_sets(sets, out)

    assert sorted(p.name for p in out.iterdir()) == ["critic_0.jsonl", "generator_0.jsonl", "generator_1.jsonl",
                                                     MANIFEST]  # no temp files, stale file gone
    assert json.loads((out / MANIFEST).read_text()) == manifest
    assert manifest["files"] == {"critic_0": {"path": "critic_0.jsonl", "examples": 2},
                                 "generator_0": {"path": "generator_0.jsonl", "examples": 12},
                                 "generator_1": {"path": "generator_1.jsonl", "examples": 1}}
    assert manifest["skipped"] == ["critic_1"]
    assert manifest["below_minimum"] == ["critic_0", "generator_1"]

    gen = _read_jsonl(out / "generator_0.jsonl")
    assert len(gen) == 12
    assert gen[0] == {"messages": [{"role": "user", "content": "What is p0?"},
                                   {"role": "assistant", "content": "4"}]}  # problem_id dropped
    assert _read_jsonl(out / "generator_1.jsonl")[0]["messages"][-1]["content"] == "ünïcode ✓"
    critic = _read_jsonl(out / "critic_0.jsonl")
    assert [m.get("weight") for m in critic[0]["messages"]] == [None, 0, None, None]
    for line in gen + critic:
        assert list(line) == ["messages"] and line["messages"][-1]["role"] == "assistant"


@pytest.mark.parametrize("example, message", [
    ({"messages": [{"role": "user", "content": "q"}]}, "last message must be the assistant target"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},
     "has weight 0"),
    ({"messages": [{"role": "user", "content": "q", "weight": 0}, {"role": "assistant", "content": "a"}]},
     "weight must be 0 or 1 on an assistant message"),
    ({"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}, "needs a role"),
    ({"problem_id": "p"}, "no 'messages' list"),
])
def test_export_refuses_bad_examples_and_writes_nothing(tmp_path: Path, example, message) -> None:
    from mft_ray.errors import ExportError
    from mft_ray.methods.openai_export import export_sets

    with pytest.raises(ExportError, match=message):
        export_sets({"generator_0": [_generator_example("p0", "4")], "critic_0": [example]}, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_export_datasets_dir_converts_what_iterate_wrote(tmp_path: Path) -> None:
    from mft_ray.errors import ExportError
    from mft_ray.methods.openai_export import export_datasets_dir
    from mft_ray.run.files import write_jsonl_atomic

    src = tmp_path / "datasets"
    write_jsonl_atomic([_generator_example("p1", "2")], src / "generator_0.jsonl")
    write_jsonl_atomic([_critic_example("p1")], src / "critic_0.jsonl")
    write_jsonl_atomic([], src / "critic_1.jsonl")
    manifest = export_datasets_dir(src, tmp_path / "out")
    assert sorted(manifest["files"]) == ["critic_0", "generator_0"] and manifest["skipped"] == ["critic_1"]
    assert _read_jsonl(tmp_path / "out" / "critic_0.jsonl")[0]["messages"][1] == {
        "role": "assistant", "content": "first try: 5", "weight": 0}
    with pytest.raises(ExportError, match="no \\*.jsonl"):
        export_datasets_dir(tmp_path / "empty", tmp_path / "out2")
