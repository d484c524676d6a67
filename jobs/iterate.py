"""Multiagent finetuning for L iterations (Algorithm 1), then evaluation of every society (Algorithm 2).

    python -m jobs.iterate --config jobs/configs/tiny_cpu.yaml [key.sub=value ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.iterate --config jobs/configs/tiny_cpu.yaml run_dir=/abs/path/run

Iteration 0 evaluates the base society (the Debate baseline). Iteration l = 1..L: society l-1 debates
the finetune split -> per-agent datasets -> 2N finetunes (concurrent) -> society l debates the
evaluation split -> metrics. Every stage's output lands in the run directory and is skipped when
found complete, so rerunning the same command after a crash resumes where it stopped.

``method=<name>`` runs a baseline or ablation instead (``mft_ray.methods``: its debate settings, dataset
rule, train units and society mapping) through the same stages; evaluation-only methods stop after
iteration 0, and STaR adds its rationalization pass (``jobs.star``) before the datasets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import sys
import time
from typing import Any, Sequence

from jobs.common import base_parser, build_builtin_model, init_ray, parse_config, preflight, run_cli
from jobs.evaluate import evaluate_society
from mft_ray.config import Config, ConfigError
from mft_ray.methods import (build_sets, build_star_sets, check_run_method, describe, get_method, method_config,
                             society_after, train_units)
from mft_ray.models import resolve_model_path
from mft_ray.preflight import require_problems
from mft_ray.reports import TABLE_NAME, write_report
from mft_ray.records import (read_json_checked, read_records, read_sealed_json, write_json_atomic,
                             write_jsonl_atomic, write_sealed_json)
from mft_ray.rundir import RunDir
from mft_ray.society import GENERATOR, Member, society_members
from mft_ray.tasks import Task, make_splits, make_task

logger = logging.getLogger("mft_ray.jobs.iterate")


def society_paths(config: Config, run: RunDir, iteration: int, repair: bool = True) -> dict[Member, str] | None:
    """Weights of each member of society ``iteration`` (None = everyone is the base model); ``repair=False``
    for callers that only read the run (a broken society.json is then left in place)."""
    if iteration == 0:
        return None
    saved = run.read_society(iteration, repair)
    if saved is None:
        raise RuntimeError(f"society of iteration {iteration} is not built yet ({run.society_path(iteration)})")
    return {m: saved.get(str(m), config.model.path)
            for m in society_members(config.debate.agents, config.debate.summarize)}


def build_datasets(config: Config, run: RunDir, task: Task, iteration: int,
                   labels: dict[str, str] | None = None,
                   rationalizations: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write iteration ``iteration``'s finetuning sets by the rule of ``config.method`` (``config`` as the
    finetune-split debate ran) from society ``iteration-1``'s finetune debate.

    ``labels`` and ``rationalizations`` are STaR's and only STaR's: any other method refuses them.
    """
    method = get_method(config.method)
    if method.uses_labels != (labels is not None) or method.uses_labels != (rationalizations is not None):
        raise ValueError(f"method {method.name!r} {'needs' if method.uses_labels else 'must not get'} "
                         "ground-truth labels and rationalizations")
    out = run.datasets_dir(iteration)
    marker = out / "counts.json"
    done = read_sealed_json(marker)  # None also when a set it seals was truncated or changed: rebuilt
    if done is not None:
        logger.info("iteration %d: datasets already built (%s)", iteration, marker)
        return done
    records = read_records(run.debate_dir(iteration - 1, "finetune"))
    if method.uses_labels:
        files, built = build_star_sets(records, labels, rationalizations, task.is_correct, task.extract_answer)
    else:
        files, built = build_sets(method, records, task.equivalent, agents=config.debate.agents,
                                  rounds=config.debate.rounds, w=config.finetune.critic_mix_w,
                                  mix_seed=config.seed + iteration, vote_seed=config.seed)
    out.mkdir(parents=True, exist_ok=True)
    for stem, examples in files.items():
        write_jsonl_atomic(examples, out / f"{stem}.jsonl")
    counts: dict[str, Any] = {"method": method.name, **built}
    counts["problems"] = len(set(records.column("problem_id").to_pylist()))
    counts["problems_with_majority"] = len({r["problem_id"] for r in records.select(
        ["problem_id", "majority"]).to_pylist() if r["majority"] is not None})
    write_sealed_json(counts, marker, sorted(out.glob("*.jsonl")))  # last: marks the stage done
    logger.info("iteration %d datasets: %s", iteration, counts)
    return counts


def _hyper(config: Config, role: str, iteration: int, n: int) -> dict[str, Any]:
    ft = config.finetune
    h = dataclasses.asdict(ft.generator if role == GENERATOR else ft.critic)
    if iteration >= 2 and ft.later_learning_rate is not None:
        h["learning_rate"] = ft.later_learning_rate
    if iteration >= 2 and ft.later_weight_decay is not None:
        h["weight_decay"] = ft.later_weight_decay
    digest = hashlib.sha256(f"{config.seed}:{iteration}:{role}:{n}".encode()).digest()
    h.update(zero_stage=ft.zero_stage, gradient_checkpointing=ft.gradient_checkpointing,
             bf16=ft.bf16 if ft.bf16 is not None else ft.gpus_per_worker > 0,
             trust_remote_code=config.model.trust_remote_code, seed=int.from_bytes(digest[:4], "little"),
             checkpoint_every_steps=ft.checkpoint_every_steps)
    return h


def finetune_society(config: Config, run: RunDir, iteration: int) -> dict[str, Any]:
    """Finetune the train units of ``config.method`` for iteration ``iteration`` (multiagent FT: every
    generator and critic on its own set), concurrently; save society.json."""
    from actors.finetune import FinetuneJob, run_finetunes

    if run.read_society(iteration) is not None:
        done = read_json_checked(run.iteration_dir(iteration) / "finetunes.json")
        if done is not None:  # (unreadable: the stage is redone; its whole checkpoints are skipped)
            logger.info("iteration %d: society already finetuned", iteration)
            return done
    method = get_method(config.method)
    base = resolve_model_path(config.model.path)
    before = society_paths(config, run, iteration - 1) or {}  # the weights each member has now
    start = before if config.finetune.init_from == "previous" else {}
    jobs, trained = [], {}
    for unit in train_units(method, config.debate.agents):
        init = resolve_model_path(start[unit.members[0]]) if start else base
        data = run.datasets_dir(iteration) / f"{unit.name}.jsonl"
        if data.stat().st_size == 0:
            # Nothing agreed with the majority (or the label): the unit keeps its weights this iteration.
            logger.warning("iteration %d: %s has no finetuning examples; it keeps %s", iteration, unit.name, init)
            trained[unit.name] = init
            continue
        out = run.agent_dir(iteration, unit.name)
        jobs.append(FinetuneJob(unit.name, init, str(data), str(out), _hyper(config, unit.role, iteration, unit.index),
                                iteration=iteration))
        trained[unit.name] = str(out)
    # Members no unit trains (the critics of "w/o critic") keep their weights.
    kept = {m: resolve_model_path(before.get(m, base)) for m in society_members(config.debate.agents, False)}
    society = society_after(method, config.debate.agents, trained, kept)
    ft = config.finetune
    logger.info("iteration %d: %d finetunes (%s)", iteration, len(jobs), ", ".join(j.name for j in jobs))
    results = run_finetunes(jobs, ft.num_workers, ft.cpus_per_worker, ft.gpus_per_worker, ft.max_failures,
                            storage_path=str(run.iteration_dir(iteration) / "ray_train"))
    write_json_atomic(results, run.iteration_dir(iteration) / "finetunes.json")
    write_json_atomic(society, run.society_path(iteration))  # last: marks the stage done
    return results


def main(config: Config) -> dict[str, Any]:
    from actors.launch import debate_split

    method = get_method(config.method)
    # ``given`` is saved and reapplied on resume; ``config`` is the method's evaluation society (and L),
    # ``collect`` the society that debates the finetune split.
    given, config = config, method_config(config, "evaluate")
    collect = method_config(given, "collect")
    if config.model.engine == "openai" and config.finetune.iterations > 0:
        # Checked before any debate: finetuning here trains local weights, which a served model has none of.
        raise ConfigError("finetune.iterations must be 0 with model.engine=openai (a served model cannot be "
                          "finetuned locally); export the sets with mft_ray.api_finetune instead, see "
                          "docs/hosted_models.md")
    run = RunDir(config.run_dir)
    check_run_method(run.root, method.name)
    task = make_task(config.task)
    splits = make_splits(task, config.task)
    require_problems(splits.eval, "eval")
    if config.finetune.iterations > 0:
        require_problems(splits.finetune, "finetune", "to build finetuning sets from (or set finetune.iterations=0)")
    preflight(config)
    base = build_builtin_model(config.model.path)
    run.check_base_model(base)
    run.prepare(given)
    run.record_base_model(base)
    init_ray()
    L = config.finetune.iterations
    if any(run.read_society(it) is None for it in range(1, L + 1)):
        # Before any debate: a finetune the cluster can never hold would otherwise wait forever.
        from actors.finetune import check_finetunes_fit

        check_finetunes_fit(config.finetune.num_workers, config.finetune.cpus_per_worker,
                            config.finetune.gpus_per_worker)
    summary: dict[str, Any] = {"task": config.task.name, "method": method.name, "method_info": describe(given),
                               "agents": config.debate.agents, "rounds": config.debate.rounds, "iterations": []}
    start = time.time()

    def record(entry: dict[str, Any]) -> None:
        summary["iterations"].append(entry)
        write_json_atomic(summary, run.summary_path)

    logger.info("[iteration 0/%d] method %s: evaluating the base society", L, method.name)
    record({**evaluate_society(config, run, task, splits.eval, 0, None), "datasets": None})
    for it in range(1, L + 1):
        logger.info("[iteration %d/%d] stage 1/4: society %d debates the finetune split (%d problems)",
                    it, L, it - 1, len(splits.finetune))
        debate_split(collect, it - 1, "finetune", splits.finetune, run.debate_dir(it - 1, "finetune"),
                     society_paths(collect, run, it - 1))
        logger.info("[iteration %d/%d] stage 2/4: building the finetuning sets (%s)", it, L, method.rule)
        labels = rationalizations = None
        if method.uses_labels:
            from jobs.star import finetune_labels, rationalize

            # STaR only: the finetune split's ground truth, read here and handed on explicitly.
            labels = finetune_labels(splits.finetune)
            rationalizations = rationalize(collect, run, task, it, splits.finetune, labels,
                                           society_paths(collect, run, it - 1))
        counts = build_datasets(collect, run, task, it, labels, rationalizations)
        logger.info("[iteration %d/%d] stage 3/4: %d finetunes", it, L,
                    len(train_units(method, config.debate.agents)))
        finetunes = finetune_society(config, run, it)
        logger.info("[iteration %d/%d] stage 4/4: society %d debates the evaluation split", it, L, it)
        metrics = evaluate_society(config, run, task, splits.eval, it, society_paths(config, run, it))
        record({**metrics, "datasets": counts,
                "finetunes": {k: {"examples": v["examples"], "loss_before": v["loss_before"],
                                  "loss_after": v["loss_after"]} for k, v in finetunes.items()}})
        logger.info("[iteration %d/%d] done after %.0fs: accuracy %.3f ± %.3f", it, L, time.time() - start,
                    metrics["accuracy"], metrics["stderr"])
    summary["table"] = write_report(run.root, summary)
    summary["report"] = str(run.root / TABLE_NAME)
    return summary


def cli(argv: Sequence[str] | None = None) -> None:
    args = base_parser(__doc__.strip().splitlines()[0]).parse_args(argv)
    summary = main(parse_config(args))
    print(summary["table"])
    print(f"(also in {summary['report']})")


if __name__ == "__main__":
    sys.exit(run_cli(cli))
