"""Evaluate a society (Algorithm 2): debate the evaluation split and score the majority answers.

    python -m jobs.evaluate --config jobs/configs/tiny_cpu.yaml [--iteration l] [key.sub=value ...]
    python -m jobs.evaluate --config X task.name=gsm8k task.path=/abs/test.jsonl \
        --society-from RUN_DIR --iteration l run_dir=NEW        # zero-shot transfer

Writes <run_dir>/iter_<l>/metrics.json with accuracy, its standard error sqrt(p(1-p)/n), consensus,
the diversity metrics (``mft_ray.metrics.diversity``) and counts, and merges that entry into
<run_dir>/metrics.json. With ``--society-from`` the society of iteration l of another run (finetuned on
its task) debates this config's task; the new run's metrics.json names the source run and its task as
``finetune_task``, which ``jobs.report`` shows as zero-shot transfer.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any, Sequence

from actors.runtime import connect_ray
from jobs.common import base_parser, parse_config, run_cli
from mft_ray import stages
from mft_ray.config import Config
from mft_ray.errors import ConfigError
from mft_ray.methods.registry import method_config
from mft_ray.models.builtin import build_builtin_model
from mft_ray.run.preflight import check_config, require_problems
from mft_ray.run.rundir import DEFAULT_METHOD, RunDir
from mft_ray.tasks import make_splits, make_task

logger = logging.getLogger("mft_ray.jobs.evaluate")


def _source_run(config: Config, source: str, iteration: int) -> tuple[RunDir, dict[str, Any]]:
    """The run whose society is evaluated on another task, checked; (its RunDir, its saved config)."""
    src = RunDir(source)
    if not src.root.is_dir():
        raise ConfigError(f"--society-from: no such run directory: {src.root}")
    saved = src.saved_config()
    if saved is None:
        raise ConfigError(f"--society-from: {src.config_path} is missing (not a run directory)")
    if src.root == RunDir(config.run_dir).root:
        raise ConfigError("--society-from must name another run directory than run_dir")
    if iteration > 0 and src.read_society(iteration, repair=False) is None:
        raise ConfigError(f"--society-from: society {iteration} of {src.root} is not built "
                          f"({src.society_path(iteration)} is missing)")
    agents = (saved.get("debate") or {}).get("agents")
    if agents is not None and agents != config.debate.agents:
        raise ConfigError(f"--society-from: {src.root} has debate.agents={agents}, this config "
                          f"debate.agents={config.debate.agents}; they must match")
    return src, saved


def main(config: Config, iteration: int = 0, society_from: str | None = None) -> dict[str, Any]:
    """Evaluate society ``iteration`` (0 = the base model; l >= 1 needs jobs.iterate's checkpoints), of this
    run or, with ``society_from``, of another run directory on this config's task (zero-shot transfer)."""
    if iteration < 0:
        raise ConfigError(f"--iteration must be >= 0, got {iteration}")
    origin: dict[str, Any] = {}
    run = source = RunDir(config.run_dir)
    if society_from is not None:
        source, src_cfg = _source_run(config, society_from, iteration)
        method = src_cfg.get("method", DEFAULT_METHOD)
        if config.method != method:
            logger.info("--society-from: evaluating with the source run's method %r", method)
            config = dataclasses.replace(config, method=method)
        src_task = (src_cfg.get("task") or {}).get("name")
        origin = {"society_from": str(source.root), "finetune_task": src_task, "method": method}
        logger.info("zero-shot transfer: society %d of %s (finetuned on %s) evaluated on %s", iteration,
                    source.root, src_task, config.task.name)
    # The method is known now (a transfer evaluates the source run's); this job finetunes nothing.
    check_config(config, finetunes=False)
    given, config = config, method_config(config, "evaluate")
    if society_from is None:
        run.check_method(config.method)
        if iteration > 0 and run.read_society(iteration, repair=False) is None:
            raise ConfigError(f"--iteration {iteration}: society {iteration} is not built yet "
                              f"({run.society_path(iteration)} is missing); run jobs.iterate first")
    task = make_task(config.task)
    problems = make_splits(task, config.task).eval
    require_problems(problems, "eval")
    build_builtin_model(config.model.path)
    paths = stages.society_paths(config, source, iteration, repair=False)
    run.prepare(given)
    metrics = stages.evaluate_society(connect_ray(), config, run, task, problems, iteration, paths)
    stages.update_summary(run, config, metrics, origin)
    return metrics


def cli(argv: Sequence[str] | None = None) -> None:
    parser = base_parser(__doc__.strip().splitlines()[0])
    parser.add_argument("--iteration", type=int, default=0, help="which society to evaluate (default 0: base)")
    parser.add_argument("--society-from", metavar="RUN_DIR",
                        help="evaluate society --iteration of this other run directory (zero-shot transfer)")
    args = parser.parse_args(argv)
    main(parse_config(args), args.iteration, args.society_from)


if __name__ == "__main__":
    sys.exit(run_cli(cli))
