"""The per-worker training loop run by Ray Train's TorchTrainer, with DeepSpeed ZeRO.

One call finetunes one agent: it loads the initial checkpoint, encodes the agent's own examples with
the model's chat template (loss on target turns only), trains with DeepSpeed (ZeRO stage from the
config; torch.distributed is already set up by Ray Train: NCCL on GPU, gloo on CPU), and exports a
Hugging Face checkpoint (model + tokenizer) to ``output_dir``. The export goes to a temporary sibling
directory that rank 0 renames into place only when complete, so a crash never leaves a directory
that looks finished.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any

from mft_ray.training.tokenize import collate, encode_example

logger = logging.getLogger(__name__)

LOSS_PROBE_EXAMPLES = 64  # examples scored before and after training to report the loss change


def read_examples(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def deepspeed_config(cfg: dict[str, Any], total_steps: int) -> dict[str, Any]:
    """DeepSpeed config for one finetune. The optimizer is torch's AdamW (no compiled op needed); the
    learning rate warms up linearly over ``warmup_ratio`` of the steps, then stays constant."""
    warmup = math.ceil(cfg["warmup_ratio"] * total_steps)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg["batch_size"],
        "gradient_accumulation_steps": cfg["grad_accum"],
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": cfg["zero_stage"]},
        "bf16": {"enabled": bool(cfg["bf16"])},
        "optimizer": {"type": "AdamW", "params": {"lr": cfg["learning_rate"], "weight_decay": cfg["weight_decay"],
                                                  "betas": [0.9, 0.999], "eps": 1e-8, "torch_adam": True}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if warmup > 0:  # WarmupLR starts at 0: with no warmup asked for, use no scheduler at all
        config["scheduler"] = {"type": "WarmupLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": cfg["learning_rate"], "warmup_num_steps": warmup,
            "warmup_type": "linear"}}
    return config


def _batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _mean_loss(engine: Any, encoded: list[dict], pad_id: int, batch_size: int, device: Any) -> float:
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for batch in _batches(encoded, batch_size):
            inputs = {k: v.to(device) for k, v in collate(batch, pad_id).items()}
            total += float(engine(**inputs).loss) * len(batch)
            count += len(batch)
    return total / max(count, 1)


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Ray Train entry point. ``cfg`` keys: init_path, data_path, output_dir, learning_rate, epochs,
    batch_size, grad_accum, weight_decay, warmup_ratio, max_length, zero_stage, bf16,
    gradient_checkpointing, seed, trust_remote_code, name."""
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    tokenizer = AutoTokenizer.from_pretrained(cfg["init_path"], trust_remote_code=cfg["trust_remote_code"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if cfg["bf16"] else torch.float32
    model = AutoModelForCausalLM.from_pretrained(cfg["init_path"], dtype=dtype,
                                                 trust_remote_code=cfg["trust_remote_code"])
    if cfg["gradient_checkpointing"]:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False

    encoded = [e for e in (encode_example(tokenizer, ex["messages"], cfg["max_length"])
                           for ex in read_examples(cfg["data_path"])) if e is not None]
    if not encoded:
        raise ValueError(f"{cfg['name']}: no trainable examples in {cfg['data_path']}")
    # Every rank must take the same number of steps: each epoch's permutation is padded by wrapping.
    per_rank = math.ceil(len(encoded) / world)
    steps_per_epoch = math.ceil(per_rank / cfg["batch_size"])
    total_steps = max(1, cfg["epochs"] * steps_per_epoch // cfg["grad_accum"])

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=deepspeed_config(cfg, total_steps))
    pad_id = tokenizer.pad_token_id
    probe = encoded[:LOSS_PROBE_EXAMPLES]
    engine.eval()
    loss_before = _mean_loss(engine, probe, pad_id, cfg["batch_size"], device)
    engine.train()
    epoch_losses = []
    for epoch in range(cfg["epochs"]):
        order = list(range(len(encoded)))
        random.Random(f"{cfg['seed']}:{epoch}").shuffle(order)
        order = (order * (world + 1))[: per_rank * world]
        mine = [encoded[i] for i in order[rank::world]]
        running, seen = 0.0, 0
        for batch in _batches(mine, cfg["batch_size"]):
            inputs = {k: v.to(device) for k, v in collate(batch, pad_id).items()}
            loss = engine(**inputs).loss
            engine.backward(loss)
            engine.step()
            running += float(loss.detach()) * len(batch)
            seen += len(batch)
        epoch_losses.append(running / max(seen, 1))
        ray.train.report({"epoch": epoch + 1, "train_loss": epoch_losses[-1]})
    engine.eval()
    loss_after = _mean_loss(engine, probe, pad_id, cfg["batch_size"], device)
    metrics = {"name": cfg["name"], "examples": len(encoded), "epochs": cfg["epochs"], "steps": total_steps,
               "loss_before": loss_before, "loss_after": loss_after, "epoch_losses": epoch_losses,
               "world_size": world, "zero_stage": cfg["zero_stage"]}
    _export(engine, model, tokenizer, cfg, metrics, rank)
    if dist.is_initialized():
        dist.barrier()


def _export(engine: Any, model: Any, tokenizer: Any, cfg: dict[str, Any], metrics: dict, rank: int) -> None:
    """Write the HF checkpoint to a temporary sibling, then rename it to ``output_dir`` (rank 0)."""
    if cfg["zero_stage"] == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank must call it
    else:
        state = None
    if rank != 0:
        return
    out = Path(cfg["output_dir"])
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model_to_save = engine.module if hasattr(engine, "module") else model
    model_to_save.save_pretrained(tmp, state_dict=state)
    tokenizer.save_pretrained(tmp)
    (tmp / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    logger.info("%s: exported %s (loss %.4f -> %.4f)", cfg["name"], out, metrics["loss_before"],
                metrics["loss_after"])
