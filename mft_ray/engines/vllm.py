"""vLLM engine for GPU nodes. vLLM is imported lazily: it is an optional extra (``pip install .[gpu]``)."""

from __future__ import annotations

import logging
from typing import Sequence

from mft_ray.engines.base import Conversation, Engine, SamplingParams
from mft_ray.errors import EngineError

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

    def score(self, conversations: Sequence[Conversation], completions: Sequence[str]) -> list[float | None]:
        """Mean per-token NLL of each completion (see ``Engine.score``) from vLLM's prompt log-probs.

        Prompt and completion are tokenized separately and concatenated, so the completion's tokens are
        exactly the last ones; ``prompt_logprobs=0`` returns the log-prob of each actual prompt token.
        """
        from vllm import SamplingParams as VSamplingParams

        if len(conversations) != len(completions):
            raise ValueError(f"score: {len(conversations)} conversations but {len(completions)} completions")
        tokenizer = self.llm.get_tokenizer()
        out: list[float | None] = [None] * len(completions)
        requests, where = [], []
        for i, (conv, completion) in enumerate(zip(conversations, completions)):
            prompt = tokenizer.apply_chat_template(list(conv), tokenize=False, add_generation_prompt=True)
            head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            tail = tokenizer(completion, add_special_tokens=False)["input_ids"]
            if tail:
                requests.append({"prompt_token_ids": head + tail})
                where.append((i, len(head)))
        if not requests:
            return out
        params = VSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        results = self.llm.generate(requests, params, use_tqdm=False)
        for (i, start), request, result in zip(where, requests, results):
            ids = request["prompt_token_ids"]
            logprobs = [result.prompt_logprobs[t][ids[t]].logprob for t in range(start, len(ids))]
            out[i] = -sum(logprobs) / len(logprobs)
        return out

    def close(self) -> None:
        del self.llm
