"""The per-worker training loop run by Ray Train's TorchTrainer, with DeepSpeed ZeRO.

One call finetunes one agent: it loads the initial checkpoint, encodes the agent's own examples with
the model's chat template (loss on target turns only), trains with DeepSpeed (ZeRO stage from the
config; torch.distributed is already set up by Ray Train: NCCL on GPU, gloo on CPU), and exports a
Hugging Face checkpoint (model + tokenizer; with ``finetune.adapter: lora`` the agent's LoRA adapter alone, the
base frozen) to ``output_dir``. The export goes to a temporary sibling directory that rank 0 renames into
place only when complete (with a manifest of its files, see ``mft_ray.training.export``), so a crash never
leaves a directory that looks finished.

Several finetunes may share one worker group (``train_lane_per_worker``): they train one after another,
so a lane pays Ray Train's start-up (controller, worker processes, process group, imports) once.

Fault tolerance: at the end of every epoch (and every ``checkpoint_every_steps`` optimizer steps, if
set) each worker saves DeepSpeed's full training state (weights, optimizer, scheduler) plus its place
in the data and reports it to Ray Train. When Ray Train restarts a failed worker group
(``FailureConfig.max_failures``) or a rerun finds the same run in storage, the loop resumes from that
checkpoint: the data order is fixed by (seed, epoch), so the finished weights equal those of an
uninterrupted run. A checkpoint from another job (another config, data file or world size) is ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any

from mft_ray.run.files import file_digest, partial_path
from mft_ray.training.export import METRICS_NAME, fsync_tree, write_manifest
from mft_ray.training.spec import FinetuneJob, TrainingSpec, hashed_spec
from mft_ray.training.tokenize import collate, encode_example, keep_target_logits

logger = logging.getLogger(__name__)

LOSS_PROBE_EXAMPLES = 64  # examples scored before and after training to report the loss change


def read_examples(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def deepspeed_config(spec: TrainingSpec, total_steps: int) -> dict[str, Any]:
    """DeepSpeed config for one finetune. The optimizer is torch's AdamW (no compiled op needed); the
    learning rate warms up linearly over ``warmup_ratio`` of the steps, then stays constant."""
    warmup = math.ceil(spec.warmup_ratio * total_steps)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": spec.batch_size,
        "gradient_accumulation_steps": spec.grad_accum,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": spec.zero_stage},
        "bf16": {"enabled": bool(spec.bf16)},
        "optimizer": {"type": "AdamW", "params": {"lr": spec.learning_rate, "weight_decay": spec.weight_decay,
                                                  "betas": [0.9, 0.999], "eps": 1e-8, "torch_adam": True}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if warmup > 0:  # WarmupLR starts at 0: with no warmup asked for, use no scheduler at all
        config["scheduler"] = {"type": "WarmupLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": spec.learning_rate, "warmup_num_steps": warmup,
            "warmup_type": "linear"}}
    return config


def _batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _mean_loss(engine: Any, encoded: list[dict], pad_id: int, batch_size: int, device: Any) -> float:
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for batch in _batches(encoded, batch_size):
            inputs = keep_target_logits({k: v.to(device) for k, v in collate(batch, pad_id).items()})
            total += float(engine(**inputs).loss) * len(batch)
            count += len(batch)
    return total / max(count, 1)


def _fingerprint(job: FinetuneJob, examples: int, world: int) -> str:
    """What a training-state checkpoint must match to be resumed: the job's settings, data and world size.

    The settings are the spec, the name and the input paths (not the output directory, the iteration or the
    test-only fault hook); hashed as the flat dict earlier versions passed to the loop, so a run started by
    one of those still resumes."""
    keys = {**hashed_spec(dataclasses.asdict(job.spec)), "init_path": job.init_path, "data_path": job.data_path,
            "name": job.name}
    if job.spec.lora is None:  # as before adapters existed, so a full finetune's checkpoint still matches
        del keys["lora"]
    else:
        keys["init_adapter"] = job.init_adapter
    blob = json.dumps({"cfg": keys, "data": file_digest(job.data_path), "examples": examples, "world": world},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


_TAG = "state"  # the DeepSpeed checkpoint tag inside a Ray Train checkpoint directory


def _state_problem(root: Path, fingerprint: str, world: int) -> str | None:
    """Why the training-state checkpoint in ``root`` cannot be resumed (None if it can)."""
    for r in range(world):
        for name in (f"trainer_state_rank{r}.json", f"files_rank{r}.json"):
            try:
                data = json.loads((root / name).read_text())
            except (OSError, ValueError) as exc:
                return f"{name}: {exc}"
            if name.startswith("trainer_state") and data.get("fingerprint") != fingerprint:
                return "it belongs to another job (settings, data or world size differ)"
            if name.startswith("files"):
                for rel, size in data.items():
                    f = root / rel
                    if not f.is_file() or f.stat().st_size != size:
                        return f"{rel} is missing or truncated"
    return None


def checkpoint_job(root: Path) -> str | None:
    """The finetune whose training state the checkpoint directory ``root`` holds (None: unreadable, or
    written before checkpoints named their job)."""
    try:
        return json.loads((root / "trainer_state_rank0.json").read_text()).get("job")
    except (OSError, ValueError, AttributeError):
        return None


def _save_state(engine: Any, state: dict[str, Any], rank: int, metrics: dict[str, Any]) -> None:
    """Save DeepSpeed's state and this rank's place in the data; report both to Ray Train (collective)."""
    import tempfile

    import ray.train

    with tempfile.TemporaryDirectory(prefix="mft-train-state-") as tmp:
        root = Path(tmp)
        engine.save_checkpoint(tmp, tag=_TAG, save_latest=False)
        (root / f"trainer_state_rank{rank}.json").write_text(json.dumps(state))
        files = {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}
        # Written last: Ray Train merges every rank's files into one directory; a resume checks that each
        # rank's list is all there with its sizes before DeepSpeed reads any of it.
        (root / f"files_rank{rank}.json").write_text(json.dumps(files))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _restore(engine: Any, fingerprint: str, world: int, name: str) -> dict[str, Any] | None:
    """The training state to resume from Ray Train's latest checkpoint, loaded into ``engine``; None if
    there is none or it cannot be used (then training starts over, which gives the same result)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    rank = ray.train.get_context().get_world_rank()
    with checkpoint.as_directory() as d:
        root = Path(d)
        owner = checkpoint_job(root)
        if owner is not None and owner != name:
            # A lane restarted before this job's first checkpoint: the latest one is an earlier job's.
            logger.info("%s: the latest checkpoint is %s's, an earlier finetune of this lane; training from the "
                        "start", name, owner)
            return None
        why = _state_problem(root, fingerprint, world)
        if why is not None:
            # Every rank reads the same files, so every rank decides the same way.
            logger.warning("%s: not resuming from checkpoint %s (%s); training from the start", name, root, why)
            return None
        # DeepSpeed's checkpoint format is torch's (pickle-based): it is read only from this run's own
        # Ray Train storage, after the fingerprint above matched the state this job wrote.
        load_path, _ = engine.load_checkpoint(d, tag=_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"{name}: DeepSpeed could not load the training state in {root}")
        state = json.loads((root / f"trainer_state_rank{rank}.json").read_text())
    logger.info("%s: resumed from %s after %d of its micro-batches", name, root, state["next"])
    return state


def _get_rng() -> dict[str, Any]:
    """torch's RNG states as JSON (dropout draws from them: a resumed run must continue the same stream)."""
    import base64

    import torch

    def enc(t: Any) -> str:
        return base64.b64encode(t.numpy().tobytes()).decode()

    out = {"cpu": enc(torch.get_rng_state())}
    if torch.cuda.is_available():
        out["cuda"] = enc(torch.cuda.get_rng_state())
    return out


def _set_rng(saved: dict[str, Any]) -> None:
    import base64

    import torch

    def dec(text: str) -> Any:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(dec(saved["cpu"]))
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(dec(saved["cuda"]))


def _fault_hook(job: FinetuneJob, rank: int) -> None:
    """Testing aid, inert unless the job has a ``fault_hook`` (a directory; never set by jobs).

    After the first checkpoint of a run that did not resume, rank 0 writes its pid to
    ``<dir>/<name>.pid`` and waits while ``<dir>/<name>.hold`` exists (at most 10 minutes), so a test can
    kill a worker at a known point of training.
    """
    if not job.fault_hook or rank != 0:
        return
    import time

    d = Path(job.fault_hook)
    (d / f"{job.name}.pid").write_text(str(os.getpid()))
    deadline = time.time() + 600
    while (d / f"{job.name}.hold").exists() and time.time() < deadline:
        time.sleep(0.1)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config``: a ``FinetuneJob`` as ``FinetuneJob.to_loop_config`` wrote it (its
    spec's ``checkpoint_every_steps``: 0 = checkpoint at the end of each epoch but the last; k > 0: also
    every k optimizer steps; None: never)."""
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job = FinetuneJob.from_loop_config(config)
    spec = job.spec
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logger.info("finetune %s: rank %d of %d, %d torch threads", job.name, rank, world, torch.get_num_threads())
    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    tokenizer = AutoTokenizer.from_pretrained(job.init_path, trust_remote_code=spec.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if spec.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(job.init_path, dtype=dtype,
                                                 trust_remote_code=spec.trust_remote_code)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if spec.lora is not None:
        model = _with_adapter(model, job)

    encoded = [e for e in (encode_example(tokenizer, ex["messages"], spec.max_length)
                           for ex in read_examples(job.data_path)) if e is not None]
    if not encoded:
        raise ValueError(f"{job.name}: no trainable examples in {job.data_path}")
    # Every rank must take the same number of steps: each epoch's permutation is padded by wrapping.
    per_rank = math.ceil(len(encoded) / world)
    steps_per_epoch = math.ceil(per_rank / spec.batch_size)  # micro-batches per epoch, on every rank
    total_micro = spec.epochs * steps_per_epoch
    total_steps = max(1, total_micro // spec.grad_accum)
    every = spec.checkpoint_every_steps

    # With LoRA only the adapter's weights train (and have optimizer state); the base stays frozen.
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable,
                                           config=deepspeed_config(spec, total_steps))
    pad_id = tokenizer.pad_token_id
    probe = encoded[:LOSS_PROBE_EXAMPLES]
    fingerprint = _fingerprint(job, len(encoded), world)
    state = _restore(engine, fingerprint, world, job.name) if every is not None else None
    resumed_at = state["next"] if state else None
    if state is None:
        engine.eval()
        state = {"fingerprint": fingerprint, "job": job.name, "next": 0, "loss_before": _mean_loss(engine, probe, pad_id,
                 spec.batch_size, device), "epoch_losses": [], "running": 0.0, "seen": 0}
    else:
        _set_rng(state["rng"])
        state["job"] = job.name  # a checkpoint written before checkpoints named their job
    hook_pending = resumed_at is None
    engine.train()
    for epoch in range(spec.epochs):
        if state["next"] >= (epoch + 1) * steps_per_epoch:
            continue  # finished before the checkpoint this run resumed from
        order = list(range(len(encoded)))
        random.Random(f"{spec.seed}:{epoch}").shuffle(order)
        order = (order * (world + 1))[: per_rank * world]
        mine = [encoded[i] for i in order[rank::world]]
        for b, batch in enumerate(_batches(mine, spec.batch_size)):
            i = epoch * steps_per_epoch + b  # this micro-batch's place in the whole run
            if i < state["next"]:
                continue
            inputs = keep_target_logits({k: v.to(device) for k, v in collate(batch, pad_id).items()})
            loss = engine(**inputs).loss
            engine.backward(loss)
            engine.step()
            state["running"] += float(loss.detach()) * len(batch)
            state["seen"] += len(batch)
            state["next"] = i + 1
            epoch_end = b == steps_per_epoch - 1
            metrics: dict[str, Any] = {"epoch": epoch + 1, "micro_batches": i + 1}
            if epoch_end:
                state["epoch_losses"].append(state["running"] / max(state["seen"], 1))
                state["running"], state["seen"] = 0.0, 0
                metrics["train_loss"] = state["epoch_losses"][-1]
            # Only at an accumulation boundary (no half-accumulated gradient to lose), and not after the
            # last micro-batch: the export that follows is the final checkpoint.
            boundary = (i + 1) % spec.grad_accum == 0 and i + 1 < total_micro
            steps_done = (i + 1) // spec.grad_accum
            due = every is not None and boundary and (epoch_end or (every > 0 and steps_done % every == 0))
            if due:
                state["rng"] = _get_rng()
                _save_state(engine, state, rank, metrics)
                if hook_pending:
                    _fault_hook(job, rank)
                    hook_pending = False
            elif epoch_end:
                ray.train.report(metrics)
    engine.eval()
    loss_after = _mean_loss(engine, probe, pad_id, spec.batch_size, device)
    metrics = {"name": job.name, "examples": len(encoded), "epochs": spec.epochs, "steps": total_steps,
               "loss_before": state["loss_before"], "loss_after": loss_after, "epoch_losses": state["epoch_losses"],
               "world_size": world, "zero_stage": spec.zero_stage, "torch_threads": torch.get_num_threads()}
    if resumed_at is not None:
        metrics["resumed_after_micro_batches"] = resumed_at
    _export(engine, model, tokenizer, job, metrics, rank)
    engine.destroy()  # its optimizer's buffers and hooks: the next finetune of a lane needs the memory
    if dist.is_initialized():
        dist.barrier()


def train_lane_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point for a lane: ``config["jobs"]`` (``FinetuneJob.to_loop_config`` each), trained one
    after another by ``train_loop_per_worker`` in this worker group. A job whose export is already whole (it
    finished before Ray Train restarted the group) is skipped; the job in progress resumes from the run's
    latest checkpoint, which is its own (an earlier job's is ignored: its fingerprint differs)."""
    import gc

    import torch
    import torch.distributed as dist

    from mft_ray.training.export import checkpoint_problem

    for job_config in config["jobs"]:
        # Rank 0's view decides for every rank, so all of them train (and meet in collectives) together.
        done = [checkpoint_problem(job_config["output_dir"]) is None]
        if dist.is_initialized():
            dist.broadcast_object_list(done, src=0)
        if done[0]:
            logger.info("%s: already exported, skipping it in this lane", job_config["name"])
            continue
        train_loop_per_worker(job_config)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _with_adapter(model: Any, job: FinetuneJob) -> Any:
    """``model`` (the frozen base) with the job's LoRA adapter: the agent's previous one, trained further
    (``init_adapter``), or a new one (PEFT initialises B to zero: the new agent starts as the base model)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    lora = job.spec.lora
    if job.spec.gradient_checkpointing:
        model.enable_input_require_grads()  # the frozen embeddings would otherwise cut the graph
    if job.init_adapter is not None:
        return PeftModel.from_pretrained(model, job.init_adapter, is_trainable=True)
    return get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))


def _export(engine: Any, model: Any, tokenizer: Any, job: FinetuneJob, metrics: dict, rank: int) -> None:
    """Write the HF checkpoint to a temporary sibling, then rename it to ``output_dir`` (rank 0)."""
    if job.spec.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank must call it
    else:
        state = None
    if rank != 0:
        return
    out = Path(job.output_dir)
    tmp = partial_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    model_to_save = engine.module if hasattr(engine, "module") else model
    if job.spec.lora is not None:
        # The adapter alone (adapter_config.json naming the base, adapter_model.safetensors): a few MB.
        model_to_save.save_pretrained(tmp)
    else:
        model_to_save.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
    (tmp / METRICS_NAME).write_text(json.dumps(metrics, indent=2) + "\n")
    fsync_tree(tmp)
    write_manifest(tmp)  # last: lists every file with its size, so a later truncation is detected
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    logger.info("%s: exported %s (loss %.4f -> %.4f)", job.name, out, metrics["loss_before"],
                metrics["loss_after"])
