"""Algorithm 1: multiagent finetuning for L iterations, with Algorithm 2's evaluation of every society.

Iteration 0 evaluates the base society (the Debate baseline). Iteration l = 1..L: society l-1 debates
the finetune split -> per-agent datasets -> 2N finetunes (concurrent) -> society l debates the
evaluation split -> metrics. Every stage (``mft_ray.stages``) skips itself when its output in the run
directory is complete, so rerunning after a crash resumes where it stopped.

``method=<name>`` runs a baseline or ablation instead (``mft_ray.methods.registry``: its debate settings,
dataset rule, train units and society mapping) through the same stages; evaluation-only methods stop
after iteration 0, and STaR adds its rationalization pass before the datasets.

Everything that needs a cluster goes through the ``stages.Runtime`` that ``connect`` returns; it is called
once every check that needs no cluster has passed (the jobs pass one that starts Ray).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from mft_ray import stages
from mft_ray.config import Config
from mft_ray.errors import ConfigError
from mft_ray.methods.registry import Method, describe, get_method, method_config
from mft_ray.models.builtin import build_builtin_model
from mft_ray.reports.run_report import write_report
from mft_ray.run.files import write_json_atomic
from mft_ray.run.preflight import check_config, check_model_endpoint, require_problems
from mft_ray.run.rundir import RunDir
from mft_ray.tasks import make_splits, make_task
from mft_ray.tasks.base import Task
from mft_ray.tasks.splits import Splits

logger = logging.getLogger(__name__)


def run_algorithm(config: Config, connect: Callable[[], stages.Runtime]) -> dict[str, Any]:
    """Run (or resume) Algorithm 1 for ``config``; returns the run's summary (also <run_dir>/metrics.json)."""
    check_config(config, endpoint=False)
    method = get_method(config.method)
    # ``given`` is saved and reapplied on resume; ``config`` is the method's evaluation society (and L),
    # ``collect`` the society that debates the finetune split.
    given, config, collect = config, method_config(config, "evaluate"), method_config(config, "collect")
    L = config.finetune.iterations
    if config.model.engine == "openai" and L > 0:
        # Checked before any debate: finetuning here trains local weights, which a served model has none of.
        raise ConfigError("finetune.iterations must be 0 with model.engine=openai (a served model cannot be "
                          "finetuned locally); export the sets with mft_ray.methods.openai_export instead, see "
                          "docs/hosted_models.md")
    check_model_endpoint(config.model)
    run = RunDir(config.run_dir)
    run.check_method(method.name)
    task = make_task(config.task)
    splits = make_splits(task, config.task)
    require_problems(splits.eval, "eval")
    if L > 0:
        require_problems(splits.finetune, "finetune", "to build finetuning sets from (or set finetune.iterations=0)")
    base = build_builtin_model(config.model.path)
    run.check_base_model(base)
    run.prepare(given)
    run.record_base_model(base)
    runtime = connect()
    try:
        return _iterate(config, collect, given, method, run, task, splits, runtime)
    finally:
        runtime.release()


def _iterate(config: Config, collect: Config, given: Config, method: Method, run: RunDir, task: Task,
             splits: Splits, runtime: stages.Runtime) -> dict[str, Any]:
    """Algorithm 1's loop on a connected runtime (``run_algorithm`` has checked everything else)."""
    L = config.finetune.iterations
    if any(run.read_society(it) is None for it in range(1, L + 1)):
        runtime.check_finetunes_fit(config.finetune)  # before any debate: a finetune that can never be placed
    summary: dict[str, Any] = {"task": config.task.name, "method": method.name, "method_info": describe(given),
                               "agents": config.debate.agents, "rounds": config.debate.rounds, "iterations": []}

    start = time.time()

    def record(entry: dict[str, Any]) -> None:
        summary["iterations"].append(entry)
        write_json_atomic(summary, run.summary_path)

    logger.info("[iteration 0/%d] method %s: evaluating the base society", L, method.name)
    record({**stages.evaluate_society(runtime, config, run, task, splits.eval, 0, None), "datasets": None})
    for it in range(1, L + 1):
        logger.info("[iteration %d/%d] society %d debates the finetune split (%d problems)",
                    it, L, it - 1, len(splits.finetune))
        before = stages.society_paths(collect, run, it - 1)
        stages.debate_split(runtime, collect, run, it - 1, "finetune", splits.finetune, before)
        labels = rationalizations = None
        if method.uses_labels:  # STaR only: the finetune split's ground truth, handed on explicitly
            labels = stages.finetune_labels(splits.finetune)
            rationalizations = stages.rationalize(runtime, collect, run, task, it, splits.finetune, labels, before)
        logger.info("[iteration %d/%d] building the finetuning sets (%s)", it, L, method.rule)
        counts = stages.build_datasets(collect, run, task, it, labels, rationalizations)
        # The society that debated the data is the one trained (its shape; the evaluation may ask fewer agents).
        finetunes = stages.finetune_society(runtime, collect, run, it)
        logger.info("[iteration %d/%d] society %d debates the evaluation split", it, L, it)
        metrics = stages.evaluate_society(runtime, config, run, task, splits.eval, it,
                                          stages.society_paths(config, run, it))
        record({**metrics, "datasets": counts,
                "finetunes": {k: {"examples": v["examples"], "loss_before": v["loss_before"],
                                  "loss_after": v["loss_after"]} for k, v in finetunes.items()}})
        logger.info("[iteration %d/%d] done after %.0fs: accuracy %.3f ± %.3f", it, L, time.time() - start,
                    metrics["accuracy"], metrics["stderr"])
    summary["table"] = write_report(run, summary)
    summary["report"] = str(run.report_path)
    return summary
