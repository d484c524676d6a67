"""How many finetunes run at once (actors.finetune.concurrent_slots): as many as the cluster holds."""

from __future__ import annotations

import pytest

from actors.finetune import concurrent_slots


@pytest.mark.parametrize(("workers", "cpus", "gpus", "total", "slots"), [
    (1, 0.5, 0.0, {"CPU": 2.0}, 4),                    # the CPU tests: 4 of 6 at a time
    (1, 1.0, 0.0, {"CPU": 2.0}, 2),
    (4, 8.0, 1.0, {"CPU": 96.0, "GPU": 8.0}, 2),       # Llama-3-8B on 8 x H100: GPUs bound it
    (4, 8.0, 1.0, {"CPU": 40.0, "GPU": 16.0}, 1),      # CPUs bound it
    (1, 0.0, 0.0, {"CPU": 2.0}, 1),                    # asks for nothing: one at a time, not unbounded
    (2, 1.0, 0.0, {"CPU": 1.0}, 1),                    # never 0: Ray queues it, check_finetunes_fit refuses
    (1, 0.3, 0.0, {"CPU": 0.9}, 3),                    # float resources
])
def test_slots_are_what_the_cluster_holds_at_once(workers, cpus, gpus, total, slots) -> None:
    assert concurrent_slots(workers, cpus, gpus, total) == slots
