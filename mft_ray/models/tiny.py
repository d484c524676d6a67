"""Tiny Llama-architecture models and their tokenizers, built locally (never downloaded).

``build_tiny_llama`` writes a randomly initialised Llama with a character- or word-level tokenizer and a
chat template; ``builtin:tiny-random`` is one, and the testbed (``mft_ray.models.testbed``) pretrains
another. They exist so that the whole pipeline (engines, actors, Ray Train) runs on a laptop CPU and in CI
with a real Hugging Face model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

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
MAX_NUMBER_TOKEN = 999  # the "words" tokenizer has one token for each integer -999..999


def build_tokenizer(kind: str = "char-v1", words: tuple[str, ...] = ()):
    """A small tokenizer with the chat special tokens and template.

    ``char-v1``: one token per character (printable ASCII, newline, tab; anything else is <|unk|>).
    ``words-v1``: additionally one token per listed word (with its leading space, if any) and per
    integer -999..999, so that arithmetic turns are ~4x shorter and a number is one token; any other
    text still falls back to characters, so every string round-trips. Either way every sampled token
    decodes to valid text.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = list(CHARACTERS)
    if kind == "words-v1":
        word_list = sorted(set(words), key=lambda w: (-len(w), w))
        pieces += [str(n) for n in range(-MAX_NUMBER_TOKEN, 0)] + [str(n) for n in range(10, MAX_NUMBER_TOKEN + 1)]
        pieces += [p for w in word_list for p in (w, " " + w) if p not in pieces]
    elif kind != "char-v1":
        raise ValueError(f"unknown tokenizer kind {kind!r}; known: char-v1, words-v1")
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, UNK_TOKEN, *pieces])}
    if kind == "char-v1":
        core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    else:
        core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
        # Every pre-token is a known word, a number of at most 3 digits or one character: all in vocab.
        # A minus sign belongs to the number only where a value starts (after "=", "{" or a space), so
        # "5-3" stays an expression while "=-2" is the single token "-2".
        alternatives = "|".join(re.escape(w) for w in word_list)
        pattern = (rf" ?(?<![A-Za-z])(?:{alternatives})(?![A-Za-z])|(?<=[={{ ])-\d{{1,3}}|(?<!\d)\d{{1,3}}"
                   r"|[\s\S]")
        core.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens([*SPECIAL_TOKENS, UNK_TOKEN])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<|pad|>", eos_token="<|end|>", unk_token=UNK_TOKEN,
        bos_token=None, clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def build_tiny_llama(out_dir: str | os.PathLike, spec: TinyModelSpec = TinyModelSpec(),
                     words: tuple[str, ...] = ()) -> Path:
    """Build a randomly initialised tiny Llama + tokenizer and ``save_pretrained`` both to ``out_dir``.

    ``words`` are the whole-word tokens of a ``words-v1`` tokenizer (``spec.tokenizer``)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(spec.tokenizer, words)
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
