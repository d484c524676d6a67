"""What one finetune needs, as types: ``TrainingSpec`` (its hyperparameters) and ``FinetuneJob`` (the spec
plus the agent's name and paths).

``training_spec`` derives an agent's spec from the run's ``Config`` (its role's settings, the later-iteration
learning rate and weight decay, a per-agent seed). A ``FinetuneJob`` crosses into Ray Train's
``train_loop_config`` as a plain dict (``to_loop_config``) and is rebuilt at the start of each worker's loop
(``FinetuneJob.from_loop_config``), so the training loop reads attributes, never string keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

from mft_ray.config import Config
from mft_ray.society.members import GENERATOR

__all__ = ["FinetuneJob", "LoraSpec", "TrainingSpec", "hashed_spec", "training_spec"]


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA adapter a finetune trains instead of the whole model (``finetune.adapter: lora``)."""

    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    base_dtype: str = "auto"  # the frozen base's dtype in the adapters' joint run (finetune.lora.base_dtype)


@dataclass(frozen=True)
class TrainingSpec:
    """Everything one finetune's training loop needs besides its paths (``mft_ray.training.loop``)."""

    learning_rate: float  # AdamW's peak learning rate
    epochs: int
    batch_size: int  # micro-batch size per worker
    grad_accum: int  # micro-batches per optimizer step
    weight_decay: float
    warmup_ratio: float  # share of the optimizer steps over which the learning rate warms up linearly
    max_length: int  # tokens per example; longer examples are truncated or dropped (training.tokenize)
    zero_stage: int  # DeepSpeed ZeRO stage, 0-3
    gradient_checkpointing: bool
    bf16: bool  # bf16 weights and DeepSpeed bf16; fp32 otherwise
    trust_remote_code: bool  # passed to transformers when the checkpoint is loaded
    seed: int  # torch's and the data order's seed
    # Training-state checkpoints: 0 = at the end of each epoch but the last; k > 0 = also every k optimizer
    # steps; None = never (a restarted finetune then starts over).
    checkpoint_every_steps: int | None
    lora: LoraSpec | None = None  # None: full finetuning


def training_spec(config: Config, role: str, iteration: int, index: int) -> TrainingSpec:
    """The spec of agent ``index`` of ``role`` (generator or critic) at ``iteration`` (1-based).

    The role's ``finetune.generator`` / ``finetune.critic`` settings, except that from iteration 2 on
    ``finetune.later_learning_rate`` and ``finetune.later_weight_decay`` replace the learning rate and weight
    decay when set; a LoRA adapter's rate is then multiplied by ``finetune.lora.lr_scale``; bf16 defaults to
    "the workers have GPUs". The seed is the first 4 bytes (little-endian)
    of sha256("<config.seed>:<iteration>:<role>:<index>"): distinct per agent and iteration, stable on rerun.
    """
    ft = config.finetune
    r = ft.generator if role == GENERATOR else ft.critic
    learning_rate, weight_decay = r.learning_rate, r.weight_decay
    if iteration >= 2 and ft.later_learning_rate is not None:
        learning_rate = ft.later_learning_rate
    if iteration >= 2 and ft.later_weight_decay is not None:
        weight_decay = ft.later_weight_decay
    if ft.adapter == "lora":
        learning_rate *= ft.lora.lr_scale
    digest = hashlib.sha256(f"{config.seed}:{iteration}:{role}:{index}".encode()).digest()
    return TrainingSpec(
        learning_rate=learning_rate, epochs=r.epochs, batch_size=r.batch_size, grad_accum=r.grad_accum,
        weight_decay=weight_decay, warmup_ratio=r.warmup_ratio, max_length=r.max_length,
        zero_stage=ft.zero_stage, gradient_checkpointing=ft.gradient_checkpointing,
        bf16=ft.bf16 if ft.bf16 is not None else ft.gpus_per_worker > 0,
        trust_remote_code=config.model.trust_remote_code, seed=int.from_bytes(digest[:4], "little"),
        checkpoint_every_steps=ft.checkpoint_every_steps,
        lora=LoraSpec(ft.lora.rank, ft.lora.alpha, ft.lora.dropout, tuple(ft.lora.target_modules), ft.lora.base_dtype)
        if ft.adapter == "lora" else None)


def hashed_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A spec as ``dataclasses.asdict`` writes it, less the fields added since checkpoints were first
    fingerprinted while they hold their defaults, so that an older run's checkpoint still resumes."""
    lora = spec.get("lora")
    if isinstance(lora, dict) and lora.get("base_dtype") == "auto":
        spec = {**spec, "lora": {k: v for k, v in lora.items() if k != "base_dtype"}}
    return spec


@dataclass(frozen=True)
class FinetuneJob:
    """One agent's finetune: where it starts, what it learns from, where its checkpoint goes, and how."""

    name: str  # e.g. "generator_0"
    init_path: str  # the Hugging Face checkpoint training starts from (with LoRA: the frozen base model)
    data_path: str  # the agent's finetuning set (JSONL, one {"messages": [...]} per line)
    output_dir: str  # where the finished checkpoint is exported
    spec: TrainingSpec
    iteration: int | None = None  # for messages only
    # Testing aid, never set by jobs: a directory where the loop parks after its first checkpoint
    # (``mft_ray.training.loop._fault_hook``). Not part of the job's identity for a resume.
    fault_hook: str | None = None
    # LoRA only: the agent's adapter of the previous iteration, which training continues (init_from: previous);
    # None starts a new adapter on ``init_path``.
    init_adapter: str | None = None

    def describe(self) -> str:
        return f"{self.name} of iteration {self.iteration}" if self.iteration is not None else \
            f"{self.name} ({self.output_dir})"

    def to_loop_config(self) -> dict[str, Any]:
        """This job as Ray Train's ``train_loop_config``: plain data (the spec as a nested dict)."""
        return dataclasses.asdict(self)  # recurses into spec

    @classmethod
    def from_loop_config(cls, data: dict[str, Any]) -> FinetuneJob:
        """The job ``to_loop_config`` wrote (unknown or missing keys raise TypeError)."""
        data = dict(data)
        spec = dict(data.pop("spec"))
        lora = spec.pop("lora", None)
        lora = LoraSpec(**{**lora, "target_modules": tuple(lora["target_modules"])}) if lora is not None else None
        return cls(**data, spec=TrainingSpec(**spec, lora=lora))
