"""The engine interface shared by every backend (HF transformers, vLLM, ...)."""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from mft_ray.errors import EngineError, ScoringNotSupported

if TYPE_CHECKING:
    from mft_ray.config import SamplingConfig

Conversation = list[dict[str, str]]  # chat messages: [{"role": "user", "content": "..."}, ...]


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings for one call. ``seed`` makes a call reproducible for the same batch."""

    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 2048
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: "SamplingConfig") -> "SamplingParams":
        return cls(cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.seed)

    def derive(self, *parts: object) -> "SamplingParams":
        """A copy whose seed is mixed with ``parts`` (e.g. shard, round, agent).

        Agents that ask the same question must not sample the same answer, and a rerun of one
        shard must reproduce it: both follow from seeding each call by what it is.
        """
        blob = ":".join(str(p) for p in (self.seed, *parts)).encode()
        return replace(self, seed=int.from_bytes(hashlib.sha256(blob).digest()[:4], "little"))


class Engine(abc.ABC):
    """Generates one reply per conversation, rendered with the model's own chat template."""

    model_path: str

    @abc.abstractmethod
    def generate(self, conversations: Sequence[Conversation], sampling: SamplingParams,
                 adapters: Sequence[str | None] | None = None) -> list[str]:
        """Return one generated text per conversation, in order. ``adapters[i]`` names the LoRA adapter that
        answers conversation i (one the engine was built with; None: the base model)."""

    def score(self, conversations: Sequence[Conversation], completions: Sequence[str],
              adapter: str | None = None) -> list[float | None]:
        """Mean per-token negative log-likelihood (nats) of each completion as this model's reply.

        Completion i is scored as the assistant turn that follows ``conversations[i]`` rendered with the
        chat template and the generation prompt, exactly as ``generate`` would continue it; only the
        completion's own tokens count (no end-of-turn token). None for a completion with no tokens.
        ``adapter``: score under that LoRA adapter (one the engine was built with). Engines that cannot score
        raise ``ScoringNotSupported``.
        """
        raise ScoringNotSupported(f"{type(self).__name__} ({self.model_path}) cannot score text: "
                                  "held-out NLL needs a local model (engine hf or vllm)")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release accelerator memory."""


def adapter_list(adapters: Sequence[str | None] | None, n: int, known: Sequence[str]) -> list[str | None]:
    """``adapters`` for ``n`` conversations (None: the base model for all), each one the engine knows."""
    if adapters is None:
        return [None] * n
    if len(adapters) != n:
        raise ValueError(f"{len(adapters)} adapters for {n} conversations")
    unknown = sorted({a for a in adapters if a is not None} - set(known))
    if unknown:
        raise EngineError(f"this engine was not built with the LoRA adapter(s) {unknown} (it has {list(known)})")
    return list(adapters)


def native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX), read from /proc/cpuinfo (Linux).

    Without them torch's bf16 matmuls are emulated: ~90x slower than fp32 on an AVX2-only CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
