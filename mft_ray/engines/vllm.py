"""vLLM engine for GPU nodes. vLLM is imported lazily: it is an optional extra (``pip install .[gpu]``)."""

from __future__ import annotations

import logging
from typing import Sequence

from mft_ray.engines.base import Conversation, Engine, EngineError, SamplingParams

logger = logging.getLogger(__name__)


class VLLMEngine(Engine):
    """``vllm.LLM.chat`` over the whole batch; vLLM schedules it with continuous batching."""

    def __init__(self, path: str, dtype: str = "auto", trust_remote_code: bool = False,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.85,
                 max_model_len: int | None = None) -> None:
        try:
            from vllm import LLM
        except ImportError as exc:
            raise EngineError("model.engine=vllm needs vLLM: install the gpu extra, pip install '.[gpu]'") from exc
        self.model_path = path
        self.llm = LLM(model=path, dtype="bfloat16" if dtype == "auto" else dtype,
                       trust_remote_code=trust_remote_code, tensor_parallel_size=tensor_parallel_size,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len)
        logger.info("vLLM engine: %s (tp=%d)", path, tensor_parallel_size)

    def generate(self, conversations: Sequence[Conversation], sampling: SamplingParams) -> list[str]:
        from vllm import SamplingParams as VSamplingParams

        if not conversations:
            return []
        # One seed per request: a shared seed would give identical prompts identical samples.
        params = [
            VSamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                            max_tokens=sampling.max_new_tokens, seed=sampling.seed + i)
            for i in range(len(conversations))
        ]
        outputs = self.llm.chat(list(conversations), sampling_params=params, use_tqdm=False)
        return [o.outputs[0].text for o in outputs]

    def close(self) -> None:
        del self.llm
