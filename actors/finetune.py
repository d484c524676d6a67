"""Launch the 2N per-agent finetunes of an iteration with Ray Train (TorchTrainer + DeepSpeed).

The finetunes run in lanes: as many Ray Train runs at once as the cluster holds (``finetune.max_concurrent``
lowers that), each training its share of the finetunes one after another in one worker group
(``mft_ray.training.loop.train_lane_per_worker``). A worker group's start-up (controller, worker processes,
process group, imports: about 20 s on a CPU) is then paid once per lane, not once per finetune, and the
cluster is as busy as before. (Handing Ray Train more worker groups than fit makes the extra ones time out
waiting for workers and restart, over and over, while they compete for the CPUs the running ones train on.)
A LoRA society's adapters may instead be one run that trains them together (``together``,
``mft_ray.training.joint_lora``). A finished finetune is recognised by its exported checkpoint (checked
whole, ``mft_ray.training.export``) and skipped.

Failures: the training loop reports a checkpoint of its full training state to Ray Train at every
epoch end (``finetune.checkpoint_every_steps`` adds more). If a worker dies, Ray Train restarts the
worker group from the latest checkpoint up to ``finetune.max_failures`` times (a lane skips the finetunes
it already exported and resumes the one in progress); past that the finetune fails with ``FinetuneError``
naming the agent and iteration, and nothing is exported for it (a half-written export is removed). Its Ray
Train checkpoints stay under ``<storage>/<run>/``: rerunning the job resumes from the latest one (the lane
of that finetune is given that run's name). They are deleted once every finetune of the iteration is
exported. The task that drives a run (``_fit``) is never retried: Ray retries a task its memory monitor
kills without limit by default (``task_oom_retries``), and a run that does not fit in memory would then
start over and over. Its death fails the finetunes with a ``FinetuneError`` instead, and a rerun resumes.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

import actors.placement as placement  # as a module: tests replace its cluster readers
from mft_ray.errors import FinetuneError, PlacementError
from mft_ray.run.files import partial_path
from mft_ray.run.plan import GIB, job_memory_gb
from mft_ray.training.export import checkpoint_problem, read_train_metrics
from mft_ray.training.joint_lora import train_adapters_per_worker
from mft_ray.training.loop import checkpoint_job, train_lane_per_worker
from mft_ray.training.slots import lanes_at_once, lone_worker_cpus, memory_slots
from mft_ray.training.spec import FinetuneJob

logger = logging.getLogger(__name__)


SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints


def _checkpoint_dirs(experiment: Path) -> list[Path] | None:
    """The checkpoint directories Ray Train's snapshot of the run in ``experiment`` registers, oldest first
    ([] without a snapshot); None if the snapshot cannot be read."""
    snapshot = experiment / SNAPSHOT
    if not snapshot.exists():
        return []
    try:
        return [experiment / r["checkpoint_dir_name"]
                for r in json.loads(snapshot.read_text()).get("checkpoint_results", [])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _usable_storage(experiment: Path) -> bool:
    """False if a Ray Train run in ``experiment`` cannot be resumed: its snapshot does not parse or names
    a checkpoint directory that is gone (Ray Train would then refuse to start the run at all)."""
    dirs = _checkpoint_dirs(experiment)
    return dirs is not None and all(d.is_dir() for d in dirs)


def train_run_name(jobs: list[FinetuneJob], together: bool = False) -> str:
    """The name of a Ray Train run (its directory under the storage path) that starts with ``jobs``: a lane is
    named after its first finetune; adapters trained together are "adapters"."""
    return "adapters" if together and len(jobs) > 1 else jobs[0].name


# max_retries=0 also turns off the retries after a kill by the memory monitor (unlimited otherwise).
@ray.remote(num_cpus=0, max_retries=0)
def _fit(jobs: list[FinetuneJob], workers: int, cpus: float, gpus: float, max_failures: int,
         storage_path: str, together: bool = False, run_name: str | None = None) -> dict[str, dict[str, Any]]:
    """One Ray Train run: a lane (``jobs`` trained one after another), or the LoRA adapters of an iteration
    trained together (``together``, ``mft_ray.training.joint_lora``); each job's training metrics. ``run_name``:
    the run's directory under ``storage_path`` (default: the first job's name, or "adapters")."""
    together = together and len(jobs) > 1
    name = run_name or train_run_name(jobs, together)
    experiment = Path(storage_path) / name
    if not _usable_storage(experiment):
        logger.warning("finetunes %s: the Ray Train run in %s is broken (unreadable snapshot or missing "
                       "checkpoint); discarding it and training from the start", ", ".join(j.name for j in jobs),
                       experiment)
        shutil.rmtree(experiment, ignore_errors=True)
    resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    configs = [j.to_loop_config() for j in jobs]
    trainer = TorchTrainer(
        train_adapters_per_worker if together else train_lane_per_worker,
        train_loop_config={"jobs": configs},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus > 0, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             # ``max_failures`` restarts per finetune, pooled within the lane.
                             failure_config=FailureConfig(max_failures=max_failures * (1 if together else len(jobs))),
                             # The latest state is all a restart needs; older ones only cost disk.
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    try:
        trainer.fit()
    except Exception as exc:  # noqa: BLE001 - every failure gets the same clear message and clean-up
        for job in jobs:  # where the loop exports before the rename
            shutil.rmtree(partial_path(job.output_dir), ignore_errors=True)
        # A lane's finetunes before the failed one are exported and stay; the failed one is the first without.
        failed = [j for j in jobs if checkpoint_problem(j.output_dir) is not None]
        if not failed:  # e.g. a worker lost after the last export: every checkpoint is whole, nothing to redo
            logger.warning("finetunes %s: Ray Train failed after every export was complete (%s); keeping them",
                           ", ".join(j.name for j in jobs), _cause(exc))
            shutil.rmtree(experiment, ignore_errors=True)
            return {job.name: read_train_metrics(job.output_dir) for job in jobs}
        what = (f"the adapters {', '.join(j.name for j in jobs)}" if together else failed[0].describe())
        outputs = ", ".join(j.output_dir for j in (jobs if together else failed))
        raise FinetuneError(
            f"finetune {what} failed (finetune.max_failures={max_failures} restarts allowed): "
            f"{_cause(exc).rstrip('.')}. Nothing was exported to {outputs}; a rerun resumes from its latest Ray "
            f"Train checkpoint in {experiment}, if one was saved") from None
    for job in jobs:
        why = checkpoint_problem(job.output_dir)
        if why is not None:
            raise FinetuneError(f"finetune {job.describe()} finished but its checkpoint {job.output_dir} is not "
                                f"whole: {why}")
    # Exported: the training-state checkpoints (optimizer states included) are no longer needed.
    shutil.rmtree(experiment, ignore_errors=True)
    return {job.name: read_train_metrics(job.output_dir) for job in jobs}


def run_result(ref: ray.ObjectRef, jobs: list[FinetuneJob], storage_path: str) -> dict[str, dict[str, Any]]:
    """What ``_fit`` returned for ``jobs``. Its own errors (``FinetuneError``) pass through; the death of the
    process running it (killed, or by Ray's memory monitor: ``OutOfMemoryError``), which takes its Ray Train
    run with it, becomes a ``FinetuneError`` naming the finetunes."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError:
        raise
    except ray.exceptions.RayError as exc:
        names = ", ".join(j.name for j in jobs)
        iteration = jobs[0].iteration
        raise FinetuneError(
            f"finetunes {names} of iteration {iteration}: the process driving their Ray Train run died "
            f"({_cause(exc).rstrip('.')}). What was exported stays; a rerun resumes the rest from their latest Ray "
            f"Train checkpoint under {storage_path}, if one was saved") from None


def _cause(exc: BaseException) -> str:
    """One short line saying why Ray Train gave up: the first worker's own error when it has one."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        exc = next(iter(failures.values()))
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if failures and lines else (lines[0] if lines else "")
    # Ray's worker-death messages run on for several sentences of generic advice: keep the first.
    end = text.find(". ", 20)
    return f"{type(exc).__name__}: {text[:end + 1] if 0 < end < 240 else text[:240]}"


def check_finetunes_fit(workers: int, cpus_per_worker: float, gpus_per_worker: float) -> None:
    """Raise PlacementError at once if one finetune's worker group can never be placed on this cluster.

    Ray Train queues a worker group that does not fit and waits, without a time limit, for resources
    that may never come; finetunes that merely have to take turns are fine.
    """
    bundle = {"CPU": cpus_per_worker, "GPU": gpus_per_worker}
    why = placement.unmet([bundle] * workers, placement.physical(ray.cluster_resources()),
                          placement.alive_node_resources())
    if why:
        raise PlacementError(f"a finetune {why}. Lower finetune.num_workers, finetune.cpus_per_worker or "
                             "finetune.gpus_per_worker, or add nodes.")


def _memory_capped(slots: int, todo: list[FinetuneJob], workers: int, cpus_per_worker: float) -> int:
    """``slots`` lowered to the CPU finetunes whose workers the nodes' memory holds at once (``memory_slots``,
    with the plan's estimate of the largest job: ``mft_ray.run.plan.job_memory_gb``). Only nodes that can host
    a worker count (a head node started with no CPUs cannot)."""
    estimates = [m for m in (job_memory_gb(j, workers) for j in todo) if m is not None]
    nodes = [r.get("memory", 0.0) / GIB for r in placement.alive_node_resources()
             if r.get("CPU", 0.0) + 1e-9 >= cpus_per_worker]
    if not estimates or not any(nodes):
        return slots
    need = max(estimates)
    if need > max(nodes):
        logger.warning("a finetune worker may need up to %.1f GiB of host memory (estimated from its batch size, "
                       "max_length and model), more than the %.1f GiB Ray gives any node; if it is killed, set "
                       "finetune.gradient_checkpointing=true or lower finetune.<role>.batch_size or max_length",
                       need, max(nodes))
    fit = memory_slots(workers, need, nodes)
    if fit < slots:
        logger.info("finetunes: %d lane(s) at once, not %d: each worker may need up to %.1f GiB of host memory and "
                    "the nodes hold %s GiB", fit, slots, need, ", ".join(f"{n:.1f}" for n in nodes))
    return min(slots, fit)


def _free_cpus_for(want: float, timeout_s: float = 10.0) -> list[float]:
    """Each node's free CPUs, waited for (up to ``timeout_s``) until one node has ``want`` free or no node
    could: a society released just before (``Runtime.finetune``) gives its CPUs back asynchronously."""
    largest = max((n.get("CPU", 0.0) for n in placement.alive_node_resources()), default=0.0)
    deadline = time.monotonic() + timeout_s
    while True:
        free = placement.free_cpus_per_node()
        if max(free, default=0.0) + 1e-9 >= min(want, largest) or time.monotonic() > deadline:
            return free
        time.sleep(0.5)


def job_cost(job: FinetuneJob) -> float:
    """A finetune's share of a lane's work: its data file's size times its epochs (a proxy for its tokens)."""
    try:
        size = Path(job.data_path).stat().st_size
    except OSError:
        size = 0
    return float(size * job.spec.epochs)


def plan_lanes(jobs: list[FinetuneJob], lanes: int, resume: Mapping[str, str] | None = None,
               cost: Callable[[FinetuneJob], float] = job_cost) -> list[tuple[str, list[FinetuneJob]]]:
    """Split ``jobs`` into at most ``lanes`` lanes of about equal ``cost``: (Ray Train run name, its jobs in
    training order). A job in ``resume`` (job name -> the run holding its latest checkpoint) leads a lane of
    that run's name, so it resumes there; every other lane is named after its first job. The rest go longest
    first onto the lane with the least work (each lane's own order: longest first)."""
    resume = resume or {}
    lanes = max(1, min(lanes, len(jobs)))
    plan: list[tuple[str, list[FinetuneJob]]] = []
    for job in jobs:
        run = resume.get(job.name)
        if run is not None and len(plan) < lanes and run not in {name for name, _ in plan}:
            plan.append((run, [job]))
    leaders = {id(lane[0]) for _, lane in plan}
    rest = sorted((j for j in jobs if id(j) not in leaders), key=cost, reverse=True)  # stable: ties keep order
    load = [cost(lane[0]) for _, lane in plan]
    taken = {name for name, _ in plan}
    for job in rest:
        if len(plan) < lanes:
            name = job.name
            while name in taken:  # a run named after this job may already hold another job's checkpoint
                name += "_"
            plan.append((name, [job]))
            load.append(cost(job))
            taken.add(name)
        else:
            k = min(range(len(plan)), key=lambda i: load[i])
            plan[k][1].append(job)
            load[k] += cost(job)
    return plan


def checkpointed_runs(storage_path: str) -> dict[str, str]:
    """Job name -> the Ray Train run under ``storage_path`` whose latest registered checkpoint is that job's
    training state (runs without one, or with one that cannot be read, are left out)."""
    owners: dict[str, str] = {}
    for snapshot in sorted(Path(storage_path).glob(f"*/{SNAPSHOT}")):
        experiment = snapshot.parent
        dirs = _checkpoint_dirs(experiment)
        if not dirs or not dirs[-1].is_dir():
            continue
        # A checkpoint from before lanes has no job name: its run was one finetune, named after it.
        owners.setdefault(checkpoint_job(dirs[-1]) or experiment.name, experiment.name)
    return owners


def run_finetunes(jobs: list[FinetuneJob], storage_path: str, workers: int = 1, cpus_per_worker: float = 1.0,
                  gpus_per_worker: float = 0.0, max_failures: int = 0, max_concurrent: int = 0,
                  together: bool = False) -> dict[str, dict[str, Any]]:
    """Run every job not already complete, in as many lanes at once as fit (at most ``max_concurrent`` if > 0),
    each lane one Ray Train run training its jobs one after another; return each job's training metrics.
    ``together``: the unfinished jobs (LoRA adapters of one base) are one Ray Train run over one copy of the
    base (``mft_ray.training.joint_lora``); on CPUs its one worker gets the CPUs the lanes would use
    (``lone_worker_cpus``). So does the worker of a single lane of separate finetunes (one CPU worker each).

    ``storage_path`` holds the Ray Train runs (``RunDir.ray_train_dir``): a killed finetune resumes there; it is
    removed once every job is exported."""
    results: dict[str, dict[str, Any]] = {}
    todo: list[FinetuneJob] = []
    for job in jobs:
        why = checkpoint_problem(job.output_dir)
        if why is None:
            logger.info("finetune %s: checkpoint already complete at %s, skipping", job.name, job.output_dir)
            results[job.name] = read_train_metrics(job.output_dir)
            continue
        if Path(job.output_dir).exists():
            logger.warning("finetune %s: %s is not a whole checkpoint (%s); redoing it", job.describe(),
                           job.output_dir, why)
        todo.append(job)
    if not todo:
        return results
    check_finetunes_fit(workers, cpus_per_worker, gpus_per_worker)
    start = time.time()
    slots = lanes_at_once(workers, cpus_per_worker, gpus_per_worker, placement.physical(ray.cluster_resources()),
                          max_concurrent)
    if together and len(todo) > 1:
        if any(j.spec.lora is None or j.init_path != todo[0].init_path for j in todo):
            raise FinetuneError("adapters trained together must all be LoRA finetunes of one base model")
        lanes = min(slots, len(todo))  # the lanes separate finetunes would run in
        cpus = lone_worker_cpus(workers, cpus_per_worker, gpus_per_worker, lanes, _free_cpus_for)
        logger.info("%d LoRA adapters trained together in one run (%g CPUs per worker): %s", len(todo), cpus,
                    ", ".join(j.name for j in todo))
        results.update(run_result(_fit.remote(todo, workers, cpus, gpus_per_worker, max_failures,
                                              storage_path, together=True), todo, storage_path))
        logger.info("adapters done in %.0fs", time.time() - start)
        shutil.rmtree(storage_path, ignore_errors=True)
        return results
    alone = [j.name for j in todo if j.spec.lora is not None and j.spec.lora.base_dtype != "auto"]
    if alone:  # one adapter left (a rerun), or a single model's: the per-agent loop, under DeepSpeed
        logger.warning("finetune.lora.base_dtype applies to adapters trained together; %s train(s) alone, in the "
                       "precision of finetune.bf16", ", ".join(alone))
    cpu_slots = slots
    if gpus_per_worker == 0:
        slots = _memory_capped(slots, todo, workers, cpus_per_worker)
    lanes = plan_lanes(todo, slots, checkpointed_runs(storage_path))
    # One lane (a single model's finetune, or the memory allows no more) would leave the CPUs the other lanes
    # could use idle: its worker takes them, as adapters trained together do.
    cpus = lone_worker_cpus(workers, cpus_per_worker, gpus_per_worker, cpu_slots, _free_cpus_for) \
        if len(lanes) == 1 else cpus_per_worker
    logger.info("%d finetunes in %d lanes at once (%g CPUs per worker): %s", len(todo), len(lanes), cpus,
                "; ".join(", ".join(j.name for j in lane) for _, lane in lanes))
    pending = {_fit.remote(lane, workers, cpus, gpus_per_worker, max_failures, storage_path,
                           run_name=name): lane for name, lane in lanes}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        lane = pending.pop(done[0])
        results.update(run_result(done[0], lane, storage_path))
        for job in lane:
            m = results[job.name]
            logger.info("finetune %s done (%.0fs): %d examples, loss %.4f -> %.4f", job.name, time.time() - start,
                        m["examples"], m["loss_before"], m["loss_after"])
    shutil.rmtree(storage_path, ignore_errors=True)  # every run's own was removed; what a killed lane left
    return results
