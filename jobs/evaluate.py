"""Evaluate a society (Algorithm 2): debate the evaluation split and score the majority answers.

    python -m jobs.evaluate --config jobs/configs/tiny_cpu.yaml [--iteration l] [key.sub=value ...]
    python -m jobs.evaluate --config X task.name=gsm8k task.path=/abs/test.jsonl \
        --society-from RUN_DIR --iteration l run_dir=NEW        # zero-shot transfer

Writes <run_dir>/iter_<l>/metrics.json with accuracy, its standard error sqrt(p(1-p)/n), consensus,
the diversity metrics (``mft_ray.diversity``) and counts, and merges that entry into
<run_dir>/metrics.json. With ``--society-from`` the society of iteration l of another run (finetuned on
its task) debates this config's task; the new run's metrics.json names the source run and its task as
``finetune_task``, which ``jobs.report`` shows as zero-shot transfer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import yaml

from jobs.common import (base_parser, build_builtin_model, init_ray, one_line, parse_config, preflight, run_cli,
                         unwrap_ray_error)
from mft_ray import diversity
from mft_ray.config import Config, ConfigError
from mft_ray.engines import EngineError
from mft_ray.evaluation import evaluate_records
from mft_ray.preflight import require_problems
from mft_ray.records import read_records, write_json_atomic
from mft_ray.methods import check_run_method, method_config
from mft_ray.rundir import RunDir
from mft_ray.society import Member
from mft_ray.tasks import Problem, Task, make_splits, make_task

logger = logging.getLogger("mft_ray.jobs.evaluate")

DIVERSITY_FILE = "diversity.json"


class HeldoutScorer:
    """One extra agent actor holding the held-out model (``metrics.nll_model``, default the base model),
    placed like any agent. It starts loading at construction, so the driver's embedding work overlaps it."""

    def __init__(self, config: Config, task: Task) -> None:
        import ray

        from actors.agent import AgentActor

        model, path = config.model, config.metrics.nll_model or config.model.path
        if model.engine == "openai":
            if config.metrics.nll_model is None:
                raise EngineError("held-out NLL skipped: engine 'openai' cannot score text; set "
                                  "metrics.nll_model to a local checkpoint, or metrics.nll_problems=0")
            model = dataclasses.replace(model, engine="hf")  # a local checkpoint next to a served society
        self.timeout_s = config.resources.placement_timeout_s
        res = config.resources
        # No restarts: a scorer that crashed (e.g. out of memory) would crash again; the metric is skipped.
        self.actor = AgentActor.options(num_cpus=res.num_cpus_per_agent, num_gpus=res.num_gpus_per_agent,
                                        max_restarts=0, max_task_retries=0).remote(
            dataclasses.asdict(model), path, ["heldout"], task.answer_instruction)
        self.ready = self.actor.info.remote()
        self._ray = ray

    def score(self, conversations: list, completions: list[str]) -> list[float | None]:
        """Mean per-token NLL of each completion (``Engine.score``); EngineError if it cannot be had."""
        ray = self._ray
        try:
            # Bounded like a society's placement: a scorer the cluster cannot start is skipped, not waited for.
            ray.get(self.ready, timeout=self.timeout_s)
            return ray.get(self.actor.score.remote(conversations, completions))
        except ray.exceptions.GetTimeoutError as exc:
            raise EngineError(f"held-out NLL skipped: the scoring actor did not start within "
                              f"{self.timeout_s:.0f}s (resources.placement_timeout_s)") from exc
        except EngineError:
            raise
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            # E.g. out of memory while scoring: the debate and its other metrics are worth keeping.
            raise EngineError(f"held-out NLL skipped: scoring failed: {str(exc).splitlines()[-1]}") from exc

    def close(self) -> None:
        self._ray.kill(self.actor)


def _settings(config: Config, problem_ids: Sequence[str]) -> dict[str, Any]:
    """What the diversity figures depend on besides the records: cached figures are reused only if equal."""
    return {**dataclasses.asdict(config.metrics), "base_model": config.model.path, "engine": config.model.engine,
            "problems": hashlib.sha256("\n".join(problem_ids).encode()).hexdigest()[:16]}


def diversity_metrics(config: Config, task: Task, records: pa.Table, problems: Sequence[Problem]) -> dict[str, Any]:
    """Consensus-free diversity figures of one evaluation debate (``mft_ray.diversity``), flat for metrics.json.

    KL over every problem; embedding dissimilarity over the first ``metrics.embedding_problems`` and
    held-out NLL over the first ``metrics.nll_problems`` problems of the split. A metric that cannot be
    computed here (no encoder package, an engine that cannot score) is None and its reason is logged and
    kept under ``diversity_details.skipped``.
    """
    m = config.metrics
    ids = [p.id for p in problems]
    out: dict[str, Any] = {"answer_kl": diversity.answer_kl(records, task.equivalent, m.kl_smoothing, ids),
                           "embedding_dissimilarity": None, "heldout_nll": None}
    details: dict[str, Any] = {"kl_smoothing": m.kl_smoothing, "kl_problems": len(ids), "skipped": {}}
    scorer: HeldoutScorer | None = None
    try:
        if m.nll_problems > 0:
            try:
                scorer = HeldoutScorer(config, task)
            except EngineError as exc:
                logger.warning("%s", exc)
                details["skipped"]["nll"] = str(exc)
        else:
            details["skipped"]["nll"] = "metrics.nll_problems is 0"
        if m.embedding:
            chosen = ids[:m.embedding_problems] if m.embedding_problems is not None else ids
            encoder = diversity.load_encoder()
            if encoder is None:
                details["skipped"]["embedding"] = f"the {diversity.ENCODER_PACKAGE} package is missing or cannot load"
            else:
                out["embedding_dissimilarity"] = diversity.embedding_dissimilarity(records, encoder, chosen)
                details.update(embedding_model=diversity.ENCODER_NAME, embedding_problems=len(chosen))
        else:
            details["skipped"]["embedding"] = "metrics.embedding is false"
        if scorer is not None:
            chosen = ids[:m.nll_problems]
            conversations, completions, keys = diversity.nll_requests(records, chosen)
            try:
                scores = scorer.score(conversations, completions)
            except EngineError as exc:  # ScoringNotSupported included: a metric never fails the evaluation
                reason = one_line(str(unwrap_ray_error(exc)))  # the actor's message, not Ray's traceback
                logger.warning("%s", reason)
                details["skipped"]["nll"] = reason
            else:
                summary = diversity.summarize_nll(scores, keys)
                out["heldout_nll"] = summary.pop("heldout_nll")
                details.update(nll_model=m.nll_model or config.model.path, nll_problems=len(chosen), **summary)
    finally:
        if scorer is not None:
            scorer.close()
    out["diversity_details"] = details
    return out


def _cached_diversity(config: Config, task: Task, records: pa.Table, problems: Sequence[Problem],
                      path: Path, reuse: bool) -> dict[str, Any]:
    """``diversity_metrics``, or the figures saved at ``path`` when the records were not redone (``reuse``)
    and the settings match: a resumed run neither reloads the encoder nor restarts the scorer."""
    settings = _settings(config, [p.id for p in problems])
    if reuse and path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            saved = {}
        if saved.get("settings") == settings:
            logger.info("diversity metrics reused from %s", path)
            return saved["metrics"]
    metrics = diversity_metrics(config, task, records, problems)
    write_json_atomic({"settings": settings, "metrics": metrics}, path)
    return metrics


def evaluate_society(config: Config, run: RunDir, task: Task, problems: Sequence[Problem], iteration: int,
                     model_paths: dict[Member, str] | None) -> dict[str, Any]:
    """Society ``iteration`` debates ``problems``; score it and write iter_<l>/metrics.json."""
    from actors.launch import debate_split

    out = run.debate_dir(iteration, "eval")
    done = debate_split(config, iteration, "eval", problems, out, model_paths)
    records = read_records(out)
    metrics = {"iteration": iteration, "task": config.task.name, "agents": config.debate.agents,
               **evaluate_records(records, problems, task, seed=config.seed)}
    metrics.update(_cached_diversity(config, task, records, problems, run.iteration_dir(iteration) / DIVERSITY_FILE,
                                     reuse=bool(done.get("skipped_all"))))
    write_json_atomic(metrics, run.metrics_path(iteration))
    logger.info("iteration %d: accuracy %.3f ± %.3f over %d problems (consensus %.3f, answer KL %s, "
                "embedding dissimilarity %s, held-out NLL %s) -> %s", iteration, metrics["accuracy"],
                metrics["stderr"], metrics["problems"], metrics["consensus"], _fmt(metrics["answer_kl"]),
                _fmt(metrics["embedding_dissimilarity"]), _fmt(metrics["heldout_nll"]), run.metrics_path(iteration))
    return metrics


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _source_run(config: Config, source: str, iteration: int) -> tuple[RunDir, dict[str, Any]]:
    """The run whose society is evaluated on another task, checked; (its RunDir, its saved config)."""
    src = RunDir(source)
    if not src.root.is_dir():
        raise ConfigError(f"--society-from: no such run directory: {src.root}")
    saved = src.root / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"--society-from: {saved} is missing (not a run directory)")
    try:
        cfg = yaml.safe_load(saved.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--society-from: {saved} is not valid YAML: {exc}") from None
    if src.root == RunDir(config.run_dir).root:
        raise ConfigError("--society-from must name another run directory than run_dir")
    if iteration > 0 and src.read_society(iteration, repair=False) is None:
        raise ConfigError(f"--society-from: society {iteration} of {src.root} is not built "
                          f"({src.society_path(iteration)} is missing)")
    agents = (cfg.get("debate") or {}).get("agents")
    if agents is not None and agents != config.debate.agents:
        raise ConfigError(f"--society-from: {src.root} has debate.agents={agents}, this config "
                          f"debate.agents={config.debate.agents}; they must match")
    return src, cfg


def _update_summary(run: RunDir, config: Config, entry: dict[str, Any], origin: dict[str, Any]) -> dict[str, Any]:
    """Merge ``entry`` into <run_dir>/metrics.json (keeping what jobs.iterate recorded for that iteration)."""
    path = run.summary_path
    summary: dict[str, Any] = {}
    if path.is_file():
        try:
            summary = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            logger.warning("%s is unreadable; rewriting it", path)
    summary.update({"task": config.task.name, "method": config.method,
                    "agents": config.debate.agents, "rounds": config.debate.rounds, **origin})
    entries = {e["iteration"]: e for e in summary.get("iterations", [])}
    entries[entry["iteration"]] = {**entries.get(entry["iteration"], {}), **entry}
    summary["iterations"] = [entries[k] for k in sorted(entries)]
    write_json_atomic(summary, path)
    return summary


def main(config: Config, iteration: int = 0, society_from: str | None = None) -> dict[str, Any]:
    """Evaluate society ``iteration`` (0 = the base model; l >= 1 needs jobs.iterate's checkpoints), of this
    run or, with ``society_from``, of another run directory on this config's task (zero-shot transfer)."""
    from jobs.iterate import society_paths

    if iteration < 0:
        raise ConfigError(f"--iteration must be >= 0, got {iteration}")
    origin: dict[str, Any] = {}
    run = source = RunDir(config.run_dir)
    if society_from is not None:
        source, src_cfg = _source_run(config, society_from, iteration)
        method = src_cfg.get("method", "multiagent_ft")
        if config.method != method:
            logger.info("--society-from: evaluating with the source run's method %r", method)
            config = dataclasses.replace(config, method=method)
        src_task = (src_cfg.get("task") or {}).get("name")
        origin = {"society_from": str(source.root), "finetune_task": src_task, "method": method}
        logger.info("zero-shot transfer: society %d of %s (finetuned on %s) evaluated on %s", iteration,
                    source.root, src_task, config.task.name)
    given, config = config, method_config(config, "evaluate")
    if society_from is None:
        check_run_method(run.root, config.method)
    if society_from is None and iteration > 0 and run.read_society(iteration, repair=False) is None:
        raise ConfigError(f"--iteration {iteration}: society {iteration} is not built yet "
                          f"({run.society_path(iteration)} is missing); run jobs.iterate first")
    task = make_task(config.task)
    problems = make_splits(task, config.task).eval
    require_problems(problems, "eval")
    preflight(config)
    build_builtin_model(config.model.path)
    paths = society_paths(config, source, iteration, repair=False)
    run.prepare(given)
    init_ray()
    metrics = evaluate_society(config, run, task, problems, iteration, paths)
    _update_summary(run, config, metrics, origin)
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
