"""Hugging Face transformers engine: batched sampling with left padding, CPU or GPU (bf16 on GPU)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator, Sequence

from mft_ray.engines.base import Conversation, Engine, SamplingParams, adapter_list
from mft_ray.errors import EngineError

logger = logging.getLogger(__name__)

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
# score(): at most this many tokens (sequences x longest sequence) per forward pass, so that a batch of long
# critic conversations never holds more activations than a few generate() steps would.
SCORE_TOKENS = 16384


class HFEngine(Engine):
    """Runs ``model.generate`` over length-sorted sub-batches of at most ``max_batch_size`` sequences.

    Sorting by prompt length before batching keeps left padding small, which matters for critic
    rounds where conversations of very different lengths meet in one call.

    ``adapters``: LoRA adapter directories (PEFT) loaded over the base model at start; each call's
    conversations are answered in groups of one adapter (or the base model) at a time.
    """

    def __init__(self, path: str, dtype: str = "auto", device: str | None = None,
                 trust_remote_code: bool = False, max_batch_size: int = 256,
                 static_cache: bool = False, adapters: Sequence[str] = ()) -> None:
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
        self.adapters = list(dict.fromkeys(adapters))
        if self.adapters:
            from peft import PeftModel

            try:
                for i, adapter in enumerate(self.adapters):
                    if i == 0:
                        self.model = PeftModel.from_pretrained(self.model, adapter, adapter_name="a0")
                    else:
                        self.model.load_adapter(adapter, adapter_name=f"a{i}")
            except (OSError, ValueError) as exc:
                raise EngineError(f"cannot load LoRA adapter {adapter!r} over {path!r}: {exc}") from exc
        self.model.eval()
        logger.info("HF engine: %s on %s (%s)%s", path, self.device, dtype,
                    f", {len(self.adapters)} LoRA adapters" if self.adapters else "")

    @contextlib.contextmanager
    def _adapter(self, adapter: str | None) -> Iterator[None]:
        """Answer with ``adapter`` (None: the base model, every adapter switched off) inside the block."""
        if not self.adapters:
            yield
        elif adapter is None:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(f"a{self.adapters.index(adapter)}")
            yield

    def _by_adapter(self, adapters: list[str | None], indices: Sequence[int]) -> list[tuple[str | None, list[int]]]:
        """``indices`` grouped by their adapter, in order of first appearance (each group keeps its order)."""
        groups: dict[str | None, list[int]] = {}
        for i in indices:
            groups.setdefault(adapters[i], []).append(i)
        return list(groups.items())

    def render(self, conversations: Sequence[Conversation]) -> list[list[int]]:
        """Token ids of each conversation with the generation prompt appended."""
        texts = self.tokenizer.apply_chat_template(
            list(conversations), tokenize=False, add_generation_prompt=True
        )
        # The template already holds any BOS text; adding special tokens again would double it.
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def generate(self, conversations: Sequence[Conversation], sampling: SamplingParams,
                 adapters: Sequence[str | None] | None = None) -> list[str]:
        import torch

        if not conversations:
            return []
        which = adapter_list(adapters, len(conversations), self.adapters)
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
        for adapter, group in self._by_adapter(which, order):
            for start in range(0, len(group), self.max_batch_size):
                idx = group[start:start + self.max_batch_size]
                batch = self.tokenizer.pad({"input_ids": [prompts[i] for i in idx]}, return_tensors="pt")
                batch = {k: v.to(self.device) for k, v in batch.items()}
                with torch.inference_mode(), self._adapter(adapter):
                    gen = self.model.generate(**batch, **kwargs)
                new = gen[:, batch["input_ids"].shape[1]:]
                texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
                for i, text in zip(idx, texts):
                    out[i] = text
        return out

    def score(self, conversations: Sequence[Conversation], completions: Sequence[str],
              adapter: str | None = None) -> list[float | None]:
        """Mean per-token NLL of each completion after its rendered conversation (see ``Engine.score``).

        Sequences are left-padded, so every completion ends at the last position and only the last
        ``max completion length + 1`` logits of a batch are kept; position ids are derived from the
        attention mask so that padding does not shift positions (``generate`` does the same).
        """
        import torch

        if len(conversations) != len(completions):
            raise ValueError(f"score: {len(conversations)} conversations but {len(completions)} completions")
        adapter_list([adapter], 1, self.adapters)  # one this engine has
        prompts = self.render(conversations) if conversations else []
        targets = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
        out: list[float | None] = [None] * len(prompts)
        order = sorted((i for i in range(len(prompts)) if targets[i]), key=lambda i: len(prompts[i]) + len(targets[i]))
        batches: list[list[int]] = []
        for i in order:
            # Sorted by length, so the newest sequence is the batch's longest.
            size = len(prompts[i]) + len(targets[i])
            if batches and len(batches[-1]) < self.max_batch_size and (len(batches[-1]) + 1) * size <= SCORE_TOKENS:
                batches[-1].append(i)
            else:
                batches.append([i])
        for idx in batches:
            seqs = [prompts[i] + targets[i] for i in idx]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for row, seq in enumerate(seqs):
                ids[row, width - len(seq):] = torch.tensor(seq)
                mask[row, width - len(seq):] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            keep = max(len(targets[i]) for i in idx) + 1  # logits at t predict token t+1
            inputs = dict(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                          position_ids=positions.to(self.device))
            with torch.inference_mode(), self._adapter(adapter):
                try:
                    logits = self.model(**inputs, logits_to_keep=keep).logits
                except TypeError:  # a model class without logits_to_keep: slice the full logits
                    logits = self.model(**inputs).logits
                logits = logits[:, -keep:]
                for row, i in enumerate(idx):
                    n = len(targets[i])
                    lp = logits[row, keep - 1 - n:keep - 1].float()
                    target = torch.tensor(targets[i], device=lp.device)
                    nll = torch.logsumexp(lp, dim=-1) - lp.gather(-1, target[:, None]).squeeze(-1)
                    out[i] = float(nll.mean())
        return out

    def close(self) -> None:
        import torch

        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
