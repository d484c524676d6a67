"""Task names → task classes, and the factory the rest of the code uses."""

from __future__ import annotations

from mft_ray.config import TaskConfig
from mft_ray.tasks.arithmetic import ArithmeticTask
from mft_ray.tasks.base import Task
from mft_ray.tasks.gsm8k import GSM8KTask
from mft_ray.tasks.math import MATHTask
from mft_ray.tasks.mmlu import MMLUTask

TASKS: dict[str, type[Task]] = {
    "arithmetic": ArithmeticTask,
    "gsm8k": GSM8KTask,
    "math": MATHTask,
    "mmlu": MMLUTask,
}


def make_task(cfg: TaskConfig) -> Task:
    """Build the task named by ``cfg.name``; an unknown name is a ValueError listing the known ones."""
    try:
        task_class = TASKS[cfg.name]
    except KeyError:
        raise ValueError(f"task.name: unknown task {cfg.name!r}; known: {sorted(TASKS)}") from None
    return task_class(cfg)
