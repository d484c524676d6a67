"""``make_engine``: the engine a ``ModelConfig`` names, built for an already resolved path.

Kept apart from the package's types (``mft_ray.engines``) so that processes which only pass conversations and
sampling settings around (the debate coordinator, the service, the ``mft`` command) do not import torch,
vLLM's helpers or the openai client.
"""

from __future__ import annotations

from typing import Sequence

from mft_ray.config import ModelConfig
from mft_ray.engines.base import Engine
from mft_ray.engines.hf import HFEngine
from mft_ray.engines.openai_compat import OpenAIEngine
from mft_ray.engines.vllm import VLLMEngine  # imports vLLM itself only when an engine is built
from mft_ray.errors import EngineError


def make_engine(model: ModelConfig, path: str | None = None, adapters: Sequence[str] = ()) -> Engine:
    """Build the engine named by ``model.engine`` for ``path`` (default ``model.path``), already resolved, with
    the LoRA ``adapters`` (directories) it will serve over that base model.

    For ``engine: openai`` the path is the served model's name and is passed through untouched.
    """
    path = path or model.path
    if model.engine == "openai":
        if adapters:
            raise EngineError("engine 'openai' cannot serve local LoRA adapters (finetune.adapter=lora)")
        if not model.base_url:
            raise EngineError("model.base_url is required for engine 'openai'")
        return OpenAIEngine(path, model.base_url, api_key_env=model.api_key_env,
                            timeout_s=model.request_timeout_s, max_retries=model.max_retries,
                            backoff_s=model.retry_backoff_s, max_concurrency=model.max_concurrency)
    if model.engine == "hf":
        return HFEngine(path, dtype=model.dtype, trust_remote_code=model.trust_remote_code,
                        max_batch_size=model.max_batch_size, static_cache=model.static_cache, adapters=adapters)
    if model.engine == "vllm":
        return VLLMEngine(path, dtype=model.dtype, trust_remote_code=model.trust_remote_code,
                          tensor_parallel_size=model.tensor_parallel_size,
                          gpu_memory_utilization=model.gpu_memory_utilization,
                          max_model_len=model.max_model_len, kv_cache_gb=model.kv_cache_gb, adapters=adapters)
    raise EngineError(f"model.engine: unknown engine {model.engine!r}")
