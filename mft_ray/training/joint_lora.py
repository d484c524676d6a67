"""The LoRA adapters of an iteration trained together: one Ray Train run over one shared frozen base.

``finetune.adapter: lora`` with ``finetune.adapters_together`` (the default): instead of 2N trainers each
loading the base model, each worker loads it once and attaches every agent's adapter (PEFT, one adapter
name per agent). Training interleaves the agents: each step activates one agent's adapter and trains it on
a micro-batch of that agent's own set, with that agent's own optimizer (torch AdamW over its adapter's
weights only), learning rate, warmup, batch size and epochs; no example or optimizer state crosses from
one agent to another. Gradients are averaged over the data-parallel ranks (gloo or NCCL) before each step.

The schedule is fixed by the jobs: epoch by epoch, the agents' micro-batches in turn (agent 0's first, agent
1's first, ..., agent 0's second, ...), each agent's examples shuffled per (its seed, epoch) as in
``mft_ray.training.loop``. At the end of every epoch but the last, every adapter's weights, every
optimizer's and scheduler's state, the place in the schedule and the RNG are reported to Ray Train as one
checkpoint; a restarted worker group, or a rerun finding it, resumes there (a checkpoint of another set of
jobs is ignored). Each adapter is exported like a finetune's checkpoint (``adapter_config.json`` +
``adapter_model.safetensors`` + ``train_metrics.json`` + manifest, renamed into place whole).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mft_ray.run.files import file_digest, partial_path
from mft_ray.training.export import METRICS_NAME, fsync_tree, write_manifest
from mft_ray.training.loop import LOSS_PROBE_EXAMPLES, _fault_hook, _get_rng, _set_rng, read_examples
from mft_ray.training.spec import FinetuneJob, hashed_spec
from mft_ray.training.tokenize import collate, encode_example, keep_target_logits

logger = logging.getLogger(__name__)

STATE_NAME = "adapters_state.pt"  # inside a Ray Train checkpoint: every adapter's and optimizer's state


def schedule(sizes: dict[str, int], batch: dict[str, int], epochs: dict[str, int],
             world: int) -> list[tuple[str, int, int]]:
    """The training order, as (agent, epoch, micro-batch of that epoch): per epoch, the agents in turn.

    ``sizes``: each agent's number of examples; every rank takes ``ceil(size / world)`` of them per epoch."""
    out = []
    for epoch in range(max(epochs.values())):
        per_agent = {a: math.ceil(math.ceil(n / world) / batch[a]) for a, n in sizes.items() if epoch < epochs[a]}
        for b in range(max(per_agent.values(), default=0)):
            out.extend((a, epoch, b) for a in per_agent if b < per_agent[a])
    return out


def _fingerprint(jobs: list[FinetuneJob], world: int) -> str:
    """What a checkpoint must match to be resumed: every job's settings and data, and the world size."""
    blob = json.dumps({"jobs": [{**job.to_loop_config(), "spec": hashed_spec(job.to_loop_config()["spec"]),
                                 "data": file_digest(job.data_path), "output_dir": None,
                                 "iteration": None, "fault_hook": None} for job in jobs], "world": world},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def base_dtype(setting: str, bf16: bool) -> Any:
    """The frozen base's torch dtype for ``finetune.lora.base_dtype``: ``auto`` follows ``finetune.bf16`` (the
    precision a full finetune of the same config trains in: bf16 on GPUs, float32 on CPUs by default)."""
    import torch

    if setting != "auto":
        return getattr(torch, setting)
    return torch.bfloat16 if bf16 else torch.float32


def train_adapters_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config["jobs"]``: the LoRA ``FinetuneJob``s of one iteration (as
    ``FinetuneJob.to_loop_config`` wrote them), all on one base model (``init_path``)."""
    import ray.train
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    jobs = [FinetuneJob.from_loop_config(j) for j in config["jobs"]]
    names = [j.name for j in jobs]
    base = jobs[0].init_path
    if any(j.init_path != base or j.spec.lora is None for j in jobs):
        raise ValueError("adapters trained together must all be LoRA finetunes of one base model")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logger.info("adapters %s: rank %d of %d, %d torch threads", names, rank, world, torch.get_num_threads())
    first = jobs[0].spec
    torch.manual_seed(first.seed)
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=first.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = base_dtype(first.lora.base_dtype, first.bf16)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, trust_remote_code=first.trust_remote_code)
    if first.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
        model.enable_input_require_grads()
    for k, job in enumerate(jobs):  # one adapter per agent, over the one base
        lora = job.spec.lora
        settings = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
        if k == 0:
            model = (PeftModel.from_pretrained(model, job.init_adapter, adapter_name=job.name, is_trainable=True)
                     if job.init_adapter else get_peft_model(model, settings, adapter_name=job.name))
        elif job.init_adapter:
            model.load_adapter(job.init_adapter, adapter_name=job.name, is_trainable=True)
        else:
            model.add_adapter(job.name, settings)
    for n, p in model.named_parameters():  # the adapters train in float32 whatever the frozen base's dtype
        if "lora_" in n:
            p.data = p.data.float()
    model.to(device)
    logger.info("adapters %s: frozen base in %s", names, dtype)

    def params(name: str) -> list[Any]:
        return [p for n, p in model.named_parameters() if f".{name}." in n and "lora_" in n]

    data = {}
    for job in jobs:
        encoded = [e for e in (encode_example(tokenizer, ex["messages"], job.spec.max_length)
                               for ex in read_examples(job.data_path)) if e is not None]
        if not encoded:
            raise ValueError(f"{job.name}: no trainable examples in {job.data_path}")
        data[job.name] = encoded
    spec = {j.name: j.spec for j in jobs}
    order = schedule({a: len(e) for a, e in data.items()}, {a: s.batch_size for a, s in spec.items()},
                     {a: s.epochs for a, s in spec.items()}, world)
    optimizers, schedulers = {}, {}
    for job in jobs:
        s = job.spec
        micro = sum(1 for a, _, _ in order if a == job.name)
        steps = max(1, micro // s.grad_accum)
        warmup = math.ceil(s.warmup_ratio * steps)
        for p in params(job.name):
            p.requires_grad_(True)
        optimizers[job.name] = torch.optim.AdamW(params(job.name), lr=s.learning_rate, weight_decay=s.weight_decay,
                                                 betas=(0.9, 0.999), eps=1e-8)
        schedulers[job.name] = torch.optim.lr_scheduler.LambdaLR(
            optimizers[job.name], (lambda w: (lambda step: min(1.0, (step + 1) / w) if w else 1.0))(warmup))

    def mean_loss(name: str) -> float:
        model.set_adapter(name)
        model.eval()
        probe, total = data[name][:LOSS_PROBE_EXAMPLES], 0.0
        with torch.no_grad():
            for i in range(0, len(probe), spec[name].batch_size):
                batch = probe[i:i + spec[name].batch_size]
                collated = collate(batch, tokenizer.pad_token_id)
                inputs = keep_target_logits({k: v.to(device) for k, v in collated.items()})
                total += float(model(**inputs).loss) * len(batch)
        return total / len(probe)

    fingerprint = _fingerprint(jobs, world)
    state = _restore(model, optimizers, schedulers, fingerprint, names)
    resumed_at = state["next"] if state else None
    if state is None:
        state = {"fingerprint": fingerprint, "next": 0, "loss_before": {a: mean_loss(a) for a in names},
                 "epoch_losses": {a: [] for a in names}, "running": {a: [0.0, 0] for a in names},
                 "micro": {a: 0 for a in names}}
    else:
        _set_rng(state["rng"])
    shuffled: dict[tuple[str, int], list[Any]] = {}
    model.train()
    for i, (agent, epoch, b) in enumerate(order):
        if i < state["next"]:
            continue
        s = spec[agent]
        if (agent, epoch) not in shuffled:  # this agent's examples for this epoch, this rank's share
            idx = list(range(len(data[agent])))
            random.Random(f"{s.seed}:{epoch}").shuffle(idx)
            per_rank = math.ceil(len(idx) / world)
            idx = (idx * (world + 1))[: per_rank * world]
            shuffled[(agent, epoch)] = [data[agent][j] for j in idx[rank::world]]
        batch = shuffled[(agent, epoch)][b * s.batch_size:(b + 1) * s.batch_size]
        model.set_adapter(agent)  # (also leaves only this adapter trainable: the others are frozen meanwhile)
        collated = collate(batch, tokenizer.pad_token_id)
        inputs = keep_target_logits({k: v.to(device) for k, v in collated.items()})
        loss = model(**inputs).loss
        (loss / s.grad_accum).backward()
        state["micro"][agent] += 1
        running = state["running"][agent]
        running[0] += float(loss.detach()) * len(batch)
        running[1] += len(batch)
        if state["micro"][agent] % s.grad_accum == 0:
            mine = params(agent)
            if world > 1:
                for p in mine:
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= world
            torch.nn.utils.clip_grad_norm_(mine, 1.0)
            optimizers[agent].step()
            schedulers[agent].step()
            optimizers[agent].zero_grad(set_to_none=True)
        state["next"] = i + 1
        if i + 1 == len(order) or order[i + 1][1] != epoch:  # the end of an epoch of the schedule
            for a, (total, seen) in state["running"].items():
                if seen:
                    state["epoch_losses"][a].append(total / seen)
                    state["running"][a] = [0.0, 0]
            metrics = {"epoch": epoch + 1, "micro_batches": i + 1}
            if i + 1 < len(order) and first.checkpoint_every_steps is not None:
                state["rng"] = _get_rng()
                _save(model, optimizers, schedulers, state, names, rank, metrics)
                if resumed_at is None and epoch == 0:
                    _fault_hook(jobs[0], rank)  # test-only, inert unless the first job has a fault_hook
            else:
                ray.train.report(metrics)
    results = {}
    for job in jobs:
        model.set_adapter(job.name)
        after = mean_loss(job.name)
        results[job.name] = {"name": job.name, "examples": len(data[job.name]), "epochs": job.spec.epochs,
                             "loss_before": state["loss_before"][job.name], "loss_after": after,
                             "epoch_losses": state["epoch_losses"][job.name], "world_size": world,
                             "adapters_together": len(jobs), "torch_threads": torch.get_num_threads()}
        if resumed_at is not None:
            results[job.name]["resumed_after_micro_batches"] = resumed_at
        if rank == 0:
            _export(model, job, results[job.name])
    if dist.is_initialized():
        dist.barrier()


def _save(model: Any, optimizers: dict, schedulers: dict, state: dict, names: list[str], rank: int,
          metrics: dict) -> None:
    """Report every adapter's and optimizer's state and the place in the schedule to Ray Train."""
    import ray.train
    import torch
    from peft import get_peft_model_state_dict

    with tempfile.TemporaryDirectory(prefix="mft-adapters-state-") as tmp:
        root = Path(tmp)
        if rank == 0:  # the ranks hold the same weights and optimizer states: rank 0 writes them
            torch.save({"adapters": {a: get_peft_model_state_dict(model, adapter_name=a) for a in names},
                        "optimizers": {a: o.state_dict() for a, o in optimizers.items()},
                        "schedulers": {a: s.state_dict() for a, s in schedulers.items()}}, root / STATE_NAME)
            size = (root / STATE_NAME).stat().st_size
            (root / "trainer_state.json").write_text(json.dumps({**state, "state_bytes": size}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _restore(model: Any, optimizers: dict, schedulers: dict, fingerprint: str, names: list[str]) -> dict | None:
    """The state to resume from Ray Train's latest checkpoint, loaded; None if there is none or it does not
    belong to these jobs (training then starts over)."""
    import ray.train
    import torch
    from peft import set_peft_model_state_dict

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        root = Path(d)
        try:
            state = json.loads((root / "trainer_state.json").read_text())
            whole = (root / STATE_NAME).stat().st_size == state.get("state_bytes")
        except (OSError, ValueError):
            state, whole = {}, False
        if state.get("fingerprint") != fingerprint or not whole:
            logger.warning("adapters %s: not resuming from %s (another set of jobs, or incomplete)", names, root)
            return None
        # Tensors, numbers and lists only (weights_only: nothing is unpickled), from this run's own Ray Train
        # storage, once the fingerprint matched the state these jobs wrote.
        saved = torch.load(root / STATE_NAME, weights_only=True)
    for a in names:
        set_peft_model_state_dict(model, saved["adapters"][a], adapter_name=a)
        optimizers[a].load_state_dict(saved["optimizers"][a])
        schedulers[a].load_state_dict(saved["schedulers"][a])
    logger.info("adapters %s: resumed after %d micro-batches", names, state["next"])
    return state


def _export(model: Any, job: FinetuneJob, metrics: dict) -> None:
    """Write one agent's adapter as a PEFT adapter directory, renamed into ``output_dir`` when whole."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    out = Path(job.output_dir)
    tmp = partial_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    settings = model.peft_config[job.name]
    settings.base_model_name_or_path = job.init_path  # what serving and `mft export` load the adapter over
    settings.save_pretrained(tmp)
    weights = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(
        model, adapter_name=job.name).items()}
    save_file(weights, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / METRICS_NAME).write_text(json.dumps(metrics, indent=2) + "\n")
    fsync_tree(tmp)
    write_manifest(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    logger.info("%s: exported adapter %s (loss %.4f -> %.4f)", job.name, out, metrics["loss_before"],
                metrics["loss_after"])
