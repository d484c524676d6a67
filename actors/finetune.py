"""Launch the 2N per-agent finetunes of an iteration with Ray Train (TorchTrainer + DeepSpeed).

Each finetune is its own TorchTrainer with its own ScalingConfig. Their ``fit()`` calls run in
separate Ray tasks, so the finetunes run concurrently when the cluster has room; a finetune whose
workers cannot be placed yet waits for resources that earlier finetunes release (Ray Train queues
its worker group). A finished finetune is recognised by its exported checkpoint and skipped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

logger = logging.getLogger(__name__)


@dataclass
class FinetuneJob:
    """One agent's finetune: where it starts, what it learns from, where its checkpoint goes."""

    name: str  # e.g. "generator_0"
    init_path: str
    data_path: str
    output_dir: str
    hyper: dict[str, Any] = field(default_factory=dict)  # learning_rate, epochs, ... (see training.loop)


def checkpoint_is_complete(path: str | Path) -> bool:
    """An exported checkpoint is complete once renamed into place with its metrics file."""
    p = Path(path)
    return (p / "config.json").is_file() and (p / "train_metrics.json").is_file()


def read_train_metrics(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "train_metrics.json").read_text())


@ray.remote(num_cpus=0)
def _fit(job: FinetuneJob, workers: int, cpus: float, gpus: float, max_failures: int,
         storage_path: str) -> dict[str, Any]:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mft_ray.training.loop import train_loop_per_worker

    resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**job.hyper, "init_path": job.init_path, "data_path": job.data_path,
                           "output_dir": job.output_dir, "name": job.name},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus > 0, resources_per_worker=resources),
        run_config=RunConfig(name=job.name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    trainer.fit()
    return read_train_metrics(job.output_dir)


def check_finetunes_fit(workers: int, cpus_per_worker: float, gpus_per_worker: float) -> None:
    """Raise PlacementError at once if one finetune's worker group can never be placed on this cluster.

    Ray Train queues a worker group that does not fit and waits, without a time limit, for resources
    that may never come; finetunes that merely have to take turns are fine.
    """
    from actors.placement import PlacementError, alive_node_resources, unmet

    bundle = {"CPU": cpus_per_worker, "GPU": gpus_per_worker}
    why = unmet([bundle] * workers, ray.cluster_resources(), alive_node_resources())
    if why:
        raise PlacementError(f"a finetune {why}. Lower finetune.num_workers, finetune.cpus_per_worker or "
                             "finetune.gpus_per_worker, or add nodes.")


def run_finetunes(jobs: list[FinetuneJob], workers: int = 1, cpus_per_worker: float = 1.0,
                  gpus_per_worker: float = 0.0, max_failures: int = 0,
                  storage_path: str | None = None) -> dict[str, dict[str, Any]]:
    """Run every job not already complete, concurrently; return each job's training metrics."""
    results: dict[str, dict[str, Any]] = {}
    pending = {}
    for job in jobs:
        if checkpoint_is_complete(job.output_dir):
            logger.info("finetune %s: checkpoint already complete at %s, skipping", job.name, job.output_dir)
            results[job.name] = read_train_metrics(job.output_dir)
            continue
        if not pending:
            check_finetunes_fit(workers, cpus_per_worker, gpus_per_worker)
        storage = storage_path or str(Path(job.output_dir).parent / "ray_train")
        ref = _fit.remote(job, workers, cpus_per_worker, gpus_per_worker, max_failures, storage)
        pending[ref] = job
    total, start = len(pending), time.time()
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(done[0])
        results[job.name] = ray.get(done[0])
        m = results[job.name]
        logger.info("finetune %s done (%d/%d, %.0fs): %d examples, loss %.4f -> %.4f", job.name,
                    total - len(pending), total, time.time() - start, m["examples"], m["loss_before"],
                    m["loss_after"])
    return results
