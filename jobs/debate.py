"""Debate one split with the society and write its records.

    python -m jobs.debate --config jobs/configs/tiny_cpu.yaml [--split finetune|eval] [key.sub=value ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.debate --config jobs/configs/tiny_cpu.yaml
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Sequence

from actors.runtime import connect_ray
from jobs.common import base_parser, parse_config, run_cli
from mft_ray import stages
from mft_ray.config import Config
from mft_ray.methods.registry import method_config
from mft_ray.models.builtin import build_builtin_model
from mft_ray.run.preflight import check_config, require_problems
from mft_ray.run.rundir import RunDir
from mft_ray.tasks import make_splits, make_task

logger = logging.getLogger("mft_ray.jobs.debate")


def main(config: Config, split: str = "finetune", iteration: int = 0) -> dict[str, Any]:
    """Run the debate of iteration ``iteration``'s society over ``split``; returns run statistics."""
    check_config(config, finetunes=False)  # this job finetunes nothing
    given, config = config, method_config(config, "collect" if split == "finetune" else "evaluate")
    run = RunDir(config.run_dir)
    run.check_method(config.method)
    task = make_task(config.task)
    splits = make_splits(task, config.task)
    problems = splits.finetune if split == "finetune" else splits.eval
    require_problems(problems, split)
    build_builtin_model(config.model.path)
    run.prepare(given)
    stats = stages.debate_split(connect_ray(), config, run, iteration, split, problems,
                                stages.society_paths(config, run, iteration))
    logger.info("records in %s", run.debate_dir(iteration, split))
    return stats


def cli(argv: Sequence[str] | None = None) -> None:
    parser = base_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--split", choices=["finetune", "eval"], default="finetune")
    args = parser.parse_args(argv)
    main(parse_config(args), args.split)


if __name__ == "__main__":
    sys.exit(run_cli(cli))
