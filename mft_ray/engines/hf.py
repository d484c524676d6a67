"""Hugging Face transformers engine: batched sampling with left padding, CPU or GPU (bf16 on GPU)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from mft_ray.engines.base import Conversation, Engine, EngineError, SamplingParams

logger = logging.getLogger(__name__)

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class HFEngine(Engine):
    """Runs ``model.generate`` over length-sorted sub-batches of at most ``max_batch_size`` sequences.

    Sorting by prompt length before batching keeps left padding small, which matters for critic
    rounds where conversations of very different lengths meet in one call.
    """

    def __init__(self, path: str, dtype: str = "auto", device: str | None = None,
                 trust_remote_code: bool = False, max_batch_size: int = 256,
                 static_cache: bool = False) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        local = Path(path).expanduser()
        if local.exists() and not (local / "config.json").is_file():
            raise EngineError(f"model path {path} is not a Hugging Face model directory (no config.json)")
        self.model_path = path
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        self.max_batch_size = max_batch_size
        self.static_cache = static_cache
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            self.model = AutoModelForCausalLM.from_pretrained(
                path, dtype=getattr(torch, _DTYPES[dtype]), trust_remote_code=trust_remote_code
            ).to(self.device)
        except (OSError, ValueError) as exc:
            raise EngineError(f"cannot load model {path!r}: {exc}") from exc
        if self.tokenizer.chat_template is None:
            raise EngineError(f"model {path!r} has no chat template; the debate needs one")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.eval()
        logger.info("HF engine: %s on %s (%s)", path, self.device, dtype)

    def render(self, conversations: Sequence[Conversation]) -> list[list[int]]:
        """Token ids of each conversation with the generation prompt appended."""
        texts = self.tokenizer.apply_chat_template(
            list(conversations), tokenize=False, add_generation_prompt=True
        )
        # The template already holds any BOS text; adding special tokens again would double it.
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def generate(self, conversations: Sequence[Conversation], sampling: SamplingParams) -> list[str]:
        import torch

        if not conversations:
            return []
        prompts = self.render(conversations)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[str] = [""] * len(prompts)
        torch.manual_seed(sampling.seed)
        kwargs = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id)
        if self.static_cache:
            # Appending to a dynamic cache copies it every step; on CPU that copy dominates decoding.
            kwargs["cache_implementation"] = "static"
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False)
        for start in range(0, len(order), self.max_batch_size):
            idx = order[start:start + self.max_batch_size]
            batch = self.tokenizer.pad({"input_ids": [prompts[i] for i in idx]}, return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with torch.inference_mode():
                gen = self.model.generate(**batch, **kwargs)
            new = gen[:, batch["input_ids"].shape[1]:]
            texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            for i, text in zip(idx, texts):
                out[i] = text
        return out

    def close(self) -> None:
        import torch

        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
