"""Benchmarks: problem pools, answer extraction, equivalence grading, and seeded splits."""

from mft_ray.errors import DataError
from mft_ray.tasks.answers import last_boxed
from mft_ray.tasks.base import Problem, Task
from mft_ray.tasks.registry import TASKS, make_task
from mft_ray.tasks.splits import Splits, make_splits

__all__ = ["DataError", "Problem", "Splits", "TASKS", "Task", "last_boxed", "make_splits", "make_task"]
