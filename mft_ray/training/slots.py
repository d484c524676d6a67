"""How much of a cluster an iteration's finetunes take at once: pure arithmetic on resource counts.

``actors.finetune`` launches the finetunes with these numbers and ``mft_ray.run.plan`` (``mft plan``)
prints them, so the plan says what a run will do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence


def concurrent_slots(workers: int, cpus_per_worker: float, gpus_per_worker: float,
                     total: Mapping[str, float]) -> int:
    """How many finetunes of ``workers`` workers fit in ``total`` resources at once (at least 1)."""
    slots = []
    for key, per_worker in (("CPU", cpus_per_worker), ("GPU", gpus_per_worker)):
        if per_worker > 0:
            slots.append(int(total.get(key, 0.0) / (workers * per_worker) + 1e-9))
    return max(1, min(slots, default=1))


def lanes_at_once(workers: int, cpus_per_worker: float, gpus_per_worker: float, total: Mapping[str, float],
                  max_concurrent: int = 0) -> int:
    """The finetune lanes ``total`` resources run at once (``concurrent_slots``), at most ``max_concurrent``
    if > 0 (``finetune.max_concurrent``)."""
    slots = concurrent_slots(workers, cpus_per_worker, gpus_per_worker, total)
    return min(slots, max_concurrent) if max_concurrent > 0 else slots


def lone_worker_cpus(workers: int, cpus_per_worker: float, gpus_per_worker: float, lanes: int,
                     node_free: Callable[[float], Sequence[float]]) -> float:
    """The CPUs of the worker of a finetune run that trains alone: the one run of a LoRA society's adapters
    trained together, or the single lane of separate finetunes (a single model's, or the one lane the host
    memory allows). One CPU worker (``workers`` 1, no GPU) takes what ``lanes`` lanes would use, within the most
    CPUs free on one node (``node_free(want)``, called only then, gives each node's), never fewer than
    ``cpus_per_worker``; any other run keeps ``cpus_per_worker``.

    The adapters share one copy of the base in one process, and the lone lane would leave the other lanes' CPUs
    idle. More CPUs make more torch threads (Ray sets OMP_NUM_THREADS to a worker's whole CPUs unless it is
    already set); the training itself (data order, batches) is unchanged. Counting only one node's free CPUs keeps
    the worker from waiting for CPUs another job holds or that no node has. ``actors.finetune`` launches with
    this and ``mft_ray.run.plan`` prints it."""
    if workers != 1 or gpus_per_worker > 0:
        return cpus_per_worker
    want = cpus_per_worker * lanes
    wide = math.floor(min(want, max(node_free(want), default=0.0)) + 1e-9)
    return max(cpus_per_worker, float(wide))


def memory_slots(workers: int, per_worker_gb: float, node_memory_gb: Sequence[float]) -> int:
    """How many finetunes of ``workers`` CPU workers, each estimated to need ``per_worker_gb`` of host memory,
    the nodes' memory holds at once; at least 1 (the estimate is an upper bound, and one at a time is the
    least a run can do). Ray does not account a process's memory, it kills the largest processes once a node
    runs out: two fp32 lanes of SmolLM2 critic finetunes (~11 GB each) were killed that way on a 24 GB machine,
    and the run then stalled, Ray retrying what its memory monitor killed."""
    if per_worker_gb <= 0:
        return 10**9
    fit = sum(int(m / per_worker_gb + 1e-9) for m in node_memory_gb) // max(workers, 1)
    return max(1, fit)
