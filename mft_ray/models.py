"""Built-in models: tiny Llama-architecture checkpoints built locally, never downloaded.

``builtin:tiny-random`` is a randomly initialised 2-layer Llama with a character-level tokenizer and a chat
template. It answers nothing useful; it exists so that the whole pipeline (engines, actors, Ray Train)
runs on a laptop CPU and in CI with a real Hugging Face model. Built models are cached under
``$MFT_CACHE_DIR`` (default ``~/.cache/mft_ray``) keyed by their settings, and written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
UNK_TOKEN = "<|unk|>"

# Roles open with a marker token and close with <|end|> (the EOS). Assistant content sits inside
# {% generation %} so that `return_assistant_tokens_mask` can find the target tokens for training.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{%- else -%}"
    "{{ message['content'] }}<|end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Architecture of a tiny Llama; every field enters the cache key."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    seed: int = 0
    tokenizer: str = "char-v1"  # bump when build_tokenizer changes, so caches rebuild

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


CHARACTERS = [chr(c) for c in range(32, 127)] + ["\n", "\t"]


def build_tokenizer():
    """A character-level tokenizer (printable ASCII, newline, tab; anything else is <|unk|>) with the
    chat special tokens and template. One token per character keeps tiny models' vocabularies small
    and makes every sampled token decode to valid text."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, UNK_TOKEN, *CHARACTERS])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    core.decoder = decoders.Fuse()
    core.add_special_tokens([*SPECIAL_TOKENS, UNK_TOKEN])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<|pad|>", eos_token="<|end|>", unk_token=UNK_TOKEN,
        bos_token=None, clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def build_tiny_llama(out_dir: str | os.PathLike, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Build a randomly initialised tiny Llama + tokenizer and ``save_pretrained`` both to ``out_dir``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None
    )
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("MFT_CACHE_DIR", Path.home() / ".cache" / "mft_ray")).expanduser()


def _build_cached(name: str, key: str, builder: Callable[[Path], object]) -> Path:
    """Build into a temporary sibling and rename, so a crash never leaves a directory that looks done."""
    target = cache_dir() / "models" / f"{name}-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        logger.info("building built-in model %s into %s", name, target)
        builder(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _tiny_random() -> Path:
    spec = TinyModelSpec()
    return _build_cached("tiny-random", spec.key(), lambda p: build_tiny_llama(p, spec))


def _testbed(mini: bool) -> Path:
    from mft_ray.testbed import MINI_TESTBED, TestbedSpec, pretrain

    spec = MINI_TESTBED if mini else TestbedSpec()
    name = "testbed-mini" if mini else "testbed"
    return _build_cached(name, spec.key(), lambda p: pretrain(p, spec))


BUILTIN_MODELS: dict[str, Callable[[], Path]] = {
    "tiny-random": _tiny_random,  # random weights: exercises the pipeline, answers nothing
    "testbed": lambda: _testbed(mini=False),  # pretrained on arithmetic debate turns (see testbed.py)
    "testbed-mini": lambda: _testbed(mini=True),  # a 30-second version for tests: parseable, rarely right
}


def resolve_model_path(path: str) -> str:
    """Turn ``builtin:<name>`` into a local checkpoint directory (building it once); pass others through."""
    from mft_ray.config import BUILTIN_PREFIX

    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_MODELS:
            raise ValueError(f"unknown built-in model {name!r}; known: {sorted(BUILTIN_MODELS)}")
        return str(BUILTIN_MODELS[name]())
    return path
