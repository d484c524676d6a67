"""Evaluate a society (Algorithm 2): debate the evaluation split and score the majority answers.

    python -m jobs.evaluate --config jobs/configs/tiny_cpu.yaml [key.sub=value ...]

Writes <run_dir>/iter_<l>/metrics.json with accuracy, its standard error sqrt(p(1-p)/n), consensus
and counts.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Sequence

from jobs.common import base_parser, init_ray, parse_config, run_cli
from mft_ray.config import Config
from mft_ray.evaluation import evaluate_records
from mft_ray.records import read_records, write_json_atomic
from mft_ray.rundir import RunDir
from mft_ray.tasks import make_splits, make_task

logger = logging.getLogger("mft_ray.jobs.evaluate")


def main(config: Config, iteration: int = 0) -> dict[str, Any]:
    from actors.launch import debate_split

    run = RunDir(config.run_dir)
    task = make_task(config.task)
    problems = make_splits(task, config.task).eval
    run.prepare(config)
    init_ray()
    out = run.debate_dir(iteration, "eval")
    debate_split(config, iteration, "eval", problems, out)
    metrics = {"iteration": iteration, "task": config.task.name, "agents": config.debate.agents,
               **evaluate_records(read_records(out), problems, task, seed=config.seed)}
    write_json_atomic(metrics, run.metrics_path(iteration))
    logger.info("iteration %d: accuracy %.3f ± %.3f over %d problems (consensus %.3f) -> %s", iteration,
                metrics["accuracy"], metrics["stderr"], metrics["problems"], metrics["consensus"],
                run.metrics_path(iteration))
    return metrics


def cli(argv: Sequence[str] | None = None) -> None:
    args = base_parser(__doc__.strip().splitlines()[0]).parse_args(argv)
    main(parse_config(args))


if __name__ == "__main__":
    sys.exit(run_cli(cli))
