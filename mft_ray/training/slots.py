"""How much of a cluster an iteration's finetunes take at once: pure arithmetic on resource counts.

``actors.finetune`` launches the finetunes with these numbers and ``mft_ray.run.plan`` (``mft plan``)
prints them, so the plan says what a run will do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def concurrent_slots(workers: int, cpus_per_worker: float, gpus_per_worker: float,
                     total: Mapping[str, float]) -> int:
    """How many finetunes of ``workers`` workers fit in ``total`` resources at once (at least 1)."""
    slots = []
    for key, per_worker in (("CPU", cpus_per_worker), ("GPU", gpus_per_worker)):
        if per_worker > 0:
            slots.append(int(total.get(key, 0.0) / (workers * per_worker) + 1e-9))
    return max(1, min(slots, default=1))


def together_cpus(cpus_per_worker: float, slots: int, node_free: Sequence[float]) -> float:
    """The CPUs of a CPU worker that trains alone: what ``slots`` lanes of separate finetunes would use, within
    the most CPUs free on one node now (``node_free``), never fewer than ``cpus_per_worker``. A LoRA society's
    adapters share one copy of the base in one process, so their run is one worker; a single model's finetune
    (or the one lane the host memory allows) is one too. More CPUs make it more torch threads (Ray sets
    OMP_NUM_THREADS to a worker's whole CPUs unless it is already set), and the training itself (data order,
    batches) is unchanged. Counting only one node's free CPUs keeps the worker from waiting for CPUs another
    job holds or that no node has."""
    wide = math.floor(min(cpus_per_worker * slots, max(node_free, default=0.0)) + 1e-9)
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
