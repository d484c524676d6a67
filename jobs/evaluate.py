"""Evaluate a society (Algorithm 2): debate the evaluation split and score the majority answers.

    python -m jobs.evaluate --config jobs/configs/tiny_cpu.yaml [key.sub=value ...]

Writes <run_dir>/iter_<l>/metrics.json with accuracy, its standard error sqrt(p(1-p)/n), consensus
and counts.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Sequence

from jobs.common import base_parser, init_ray, parse_config, preflight, run_cli
from mft_ray.config import Config, ConfigError
from mft_ray.evaluation import evaluate_records
from mft_ray.preflight import require_problems
from mft_ray.records import read_records, write_json_atomic
from mft_ray.rundir import RunDir
from mft_ray.society import Member
from mft_ray.tasks import Problem, Task, make_splits, make_task

logger = logging.getLogger("mft_ray.jobs.evaluate")


def evaluate_society(config: Config, run: RunDir, task: Task, problems: Sequence[Problem], iteration: int,
                     model_paths: dict[Member, str] | None) -> dict[str, Any]:
    """Society ``iteration`` debates ``problems``; score it and write iter_<l>/metrics.json."""
    from actors.launch import debate_split

    out = run.debate_dir(iteration, "eval")
    debate_split(config, iteration, "eval", problems, out, model_paths)
    metrics = {"iteration": iteration, "task": config.task.name, "agents": config.debate.agents,
               **evaluate_records(read_records(out), problems, task, seed=config.seed)}
    write_json_atomic(metrics, run.metrics_path(iteration))
    logger.info("iteration %d: accuracy %.3f ± %.3f over %d problems (consensus %.3f) -> %s", iteration,
                metrics["accuracy"], metrics["stderr"], metrics["problems"], metrics["consensus"],
                run.metrics_path(iteration))
    return metrics


def main(config: Config, iteration: int = 0) -> dict[str, Any]:
    """Evaluate society ``iteration`` (0 = the base model; l >= 1 needs jobs.iterate's checkpoints)."""
    from jobs.iterate import society_paths

    run = RunDir(config.run_dir)
    if iteration < 0:
        raise ConfigError(f"--iteration must be >= 0, got {iteration}")
    if iteration > 0 and run.read_society(iteration) is None:
        raise ConfigError(f"--iteration {iteration}: society {iteration} is not built yet "
                          f"({run.society_path(iteration)} is missing); run jobs.iterate first")
    task = make_task(config.task)
    problems = make_splits(task, config.task).eval
    require_problems(problems, "eval")
    preflight(config)
    paths = society_paths(config, run, iteration)
    run.prepare(config)
    init_ray()
    return evaluate_society(config, run, task, problems, iteration, paths)


def cli(argv: Sequence[str] | None = None) -> None:
    parser = base_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--iteration", type=int, default=0, help="which society to evaluate (default 0: base)")
    args = parser.parse_args(argv)
    main(parse_config(args), args.iteration)


if __name__ == "__main__":
    sys.exit(run_cli(cli))
