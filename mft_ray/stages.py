"""The stages of Algorithm 1, each with one resume contract: "done? load : run, then write atomically".

    debate_split       a society debates a split             -> iter_<l>/debate_<split>/shard_*.parquet
    rationalize        STaR re-asks its wrong answers         -> iter_<l>/star_rationalizations.jsonl
    build_datasets     the per-agent finetuning sets          -> iter_<l>/datasets/*.jsonl + counts.json
    finetune_society   the method's finetunes, concurrently   -> iter_<l>/<unit>/ + finetunes.json + society.json
    evaluate_society   Algorithm 2 and the diversity metrics  -> iter_<l>/metrics.json (+ diversity.json)

Every file name comes from ``RunDir``, which also answers "is this stage done?". The stages hold the
algorithm, not the cluster: whatever needs actors (a debate, generation, finetunes, the held-out scorer)
goes through a ``Runtime``, which the jobs give them (``actors.runtime.RayRuntime`` on Ray; tests may
pass a fake). So this module imports nothing from ``actors`` and runs on the driver only.

Ground truth: only ``evaluate_society`` (scoring) and STaR's ``finetune_labels`` read a problem's answer;
no other stage does, so no label reaches a label-free method's finetuning data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import defaultdict
from typing import Any, Mapping, Protocol, Sequence

import pyarrow as pa

from mft_ray.config import Config, FinetuneConfig
from mft_ray.engines import Conversation
from mft_ray.errors import ConfigError, EngineError, one_line
from mft_ray.methods.datasets import build_sets, build_star_sets, star_requests
from mft_ray.methods.registry import get_method, prompt_set, society_after, train_units
from mft_ray.metrics import diversity
from mft_ray.metrics.accuracy import evaluate_records
from mft_ray.models.adapters import is_adapter
from mft_ray.models.builtin import resolve_model_path
from mft_ray.run.files import read_jsonl_checked, write_json_atomic, write_jsonl_atomic
from mft_ray.run.records import debate_settings, read_records
from mft_ray.run.rundir import RunDir
from mft_ray.society.members import CRITIC, GENERATOR, Member, society_members
from mft_ray.tasks import Problem, Task
from mft_ray.training.spec import FinetuneJob, training_spec

logger = logging.getLogger(__name__)


class HeldoutScorer(Protocol):
    """A held-out model that scores completions (the held-out NLL metric)."""

    def score(self, conversations: Sequence[Conversation], completions: Sequence[str]) -> list[float | None]:
        """Mean per-token NLL of each completion; EngineError if it cannot be had."""

    def close(self) -> None:
        """Release the model."""


class Runtime(Protocol):
    """What the stages ask of the cluster. ``actors.runtime.RayRuntime`` is the implementation."""

    def debate(self, config: Config, iteration: int, split: str, problems: Sequence[Problem], out_dir: str,
               model_paths: Mapping[Member, str] | None = None) -> dict[str, Any]:
        """Debate ``problems`` with a society (placed and loaded, or one still placed for it); write shards
        under ``out_dir``."""

    def generate(self, config: Config, model_paths: Mapping[Member, str] | None,
                 requests: Mapping[str, Sequence[Conversation]], seed_parts: Sequence[object],
                 name: str) -> dict[str, list[str]]:
        """Member name -> one reply per conversation in ``requests[member]``, seeded by ``seed_parts``."""

    def heldout_scorer(self, config: Config) -> HeldoutScorer:
        """Start the held-out model of ``metrics.nll_model``; EngineError if it cannot be had."""

    def check_finetunes_fit(self, finetune: FinetuneConfig) -> None:
        """PlacementError at once if one finetune's worker group can never be placed."""

    def finetune(self, jobs: Sequence[FinetuneJob], finetune: FinetuneConfig, storage_path: str) -> dict[str, Any]:
        """Run every job not already complete, concurrently; each job's training metrics by name."""

    def release(self) -> None:
        """Free whatever the runtime keeps placed between calls (a society that may debate again)."""


# -- society -----------------------------------------------------------------------------------------


def society_paths(config: Config, run: RunDir, iteration: int, repair: bool = True) -> dict[Member, str] | None:
    """Weights of each member of society ``iteration`` (None = everyone is the base model); ``repair=False``
    for callers that only read the run (a broken society.json is then left in place)."""
    if iteration == 0:
        return None
    saved = run.read_society(iteration, repair)
    if saved is None:
        raise ConfigError(f"society {iteration} is not built yet ({run.society_path(iteration)} is missing)")
    return {m: saved.get(str(m), config.model.path)
            for m in society_members(config.debate.agents, config.debate.summarize)}


# -- debate --------------------------------------------------------------------------------------------


def debate_split(runtime: Runtime, config: Config, run: RunDir, iteration: int, split: str,
                 problems: Sequence[Problem], model_paths: Mapping[Member, str] | None) -> dict[str, Any]:
    """Society ``iteration`` debates ``problems`` of ``split``; skipped when every shard is written.

    Only ids and question texts reach the actors: ground-truth answers never leave the driver.
    """
    out = run.debate_dir(iteration, split)
    d = config.debate
    settings = debate_settings(d.agents, d.rounds, d.summarize, d.shuffle_others)
    if run.debate_complete(iteration, split, [p.id for p in problems], d.shard_size, settings):
        logger.info("debate %s iter %d: all shards already complete in %s", split, iteration, out)
        return {"split": split, "iteration": iteration, "problems": len(problems), "skipped_all": True}
    return runtime.debate(config, iteration, split, problems, str(out), model_paths)


# -- STaR ----------------------------------------------------------------------------------------------


def finetune_labels(problems: Sequence[Problem]) -> dict[str, str]:
    """Problem id -> ground-truth answer of the finetune split: STaR's labels, read here and only here."""
    return {p.id: p.answer for p in problems}


def rationalize(runtime: Runtime, config: Config, run: RunDir, task: Task, iteration: int,
                problems: Sequence[Problem], labels: Mapping[str, str],
                model_paths: Mapping[Member, str] | None) -> list[dict[str, Any]]:
    """STaR's rationalization pass (Zelikman et al. 2022): society ``iteration-1`` re-answers every wrong
    round-1 answer of its finetune debate, through the generator that wrote it, with the label as a hint.

    Writes and returns ``[{"problem_id", "agent", "messages", "response"}]``; skipped when the file holds
    one whole answer per wrong reply. The labels go into the hinted prompts and that file only.
    """
    path = run.rationalizations_path(iteration)
    wrong = star_requests(read_records(run.debate_dir(iteration - 1, "finetune")), labels, task.is_correct)
    saved = read_jsonl_checked(path, expected=len(wrong))
    if saved is not None:
        logger.info("iteration %d: STaR rationalizations already written (%s)", iteration, path)
        return saved
    questions = {p.id: p.question for p in problems}
    prompts = prompt_set(config)
    requests: dict[Member, list] = defaultdict(list)
    keys: dict[Member, list[str]] = defaultdict(list)
    for pid, n in wrong:
        member = Member(GENERATOR, n)
        requests[member].append([{"role": "user", "content": prompts.rationalize(questions[pid], labels[pid])}])
        keys[member].append(pid)
    logger.info("iteration %d: STaR re-asks %d wrong round-1 answers with the true answer as a hint",
                iteration, len(wrong))
    replies = runtime.generate(config, model_paths, {str(m): r for m, r in requests.items()},
                               (iteration - 1, "finetune", "rationalize"),
                               name=f"society-iter{iteration - 1}-rationalize") if wrong else {}
    rows = [{"problem_id": pid, "agent": member.index, "messages": conv, "response": text}
            for member in sorted(requests)
            for pid, conv, text in zip(keys[member], requests[member], replies[str(member)])]
    write_jsonl_atomic(rows, path)
    return rows


# -- finetuning sets -----------------------------------------------------------------------------------


def build_datasets(config: Config, run: RunDir, task: Task, iteration: int,
                   labels: Mapping[str, str] | None = None,
                   rationalizations: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write iteration ``iteration``'s finetuning sets by the rule of ``config.method`` (``config`` as the
    finetune-split debate ran) from society ``iteration-1``'s finetune debate; return their counts.

    ``labels`` and ``rationalizations`` are STaR's and only STaR's: any other method refuses them.
    """
    method = get_method(config.method)
    if method.uses_labels != (labels is not None) or method.uses_labels != (rationalizations is not None):
        raise ValueError(f"method {method.name!r} {'needs' if method.uses_labels else 'must not get'} "
                         "ground-truth labels and rationalizations")
    done = run.read_datasets(iteration)
    if done is not None:
        logger.info("iteration %d: datasets already built (%s)", iteration, run.datasets_marker(iteration))
        return done
    records = read_records(run.debate_dir(iteration - 1, "finetune"))
    if method.uses_labels:
        files, built = build_star_sets(records, labels, rationalizations, task.is_correct, task.extract_answer)
    else:
        files, built = build_sets(method, records, task.equivalent, agents=config.debate.agents,
                                  rounds=config.debate.rounds, w=config.finetune.critic_mix_w,
                                  mix_seed=config.seed + iteration, vote_seed=config.seed,
                                  single_agent_budget=config.finetune.single_agent_budget)
    for unit, examples in files.items():
        write_jsonl_atomic(examples, run.dataset_path(iteration, unit))
    counts: dict[str, Any] = {"method": method.name, **built}
    counts["problems"] = len(set(records.column("problem_id").to_pylist()))
    counts["problems_with_majority"] = len({r["problem_id"] for r in records.select(
        ["problem_id", "majority"]).to_pylist() if r["majority"] is not None})
    run.seal_datasets(iteration, counts)  # last: marks the stage done
    logger.info("iteration %d datasets: %s", iteration, counts)
    return counts


# -- finetuning ----------------------------------------------------------------------------------------


def finetune_society(runtime: Runtime, config: Config, run: RunDir, iteration: int) -> dict[str, Any]:
    """Finetune the train units of ``config.method`` for iteration ``iteration`` (multiagent FT: every
    generator and critic on its own set), concurrently; write finetunes.json, then society.json."""
    done = run.read_finetunes(iteration)
    if done is not None:
        logger.info("iteration %d: society already finetuned", iteration)
        return done
    method = get_method(config.method)
    base = resolve_model_path(config.model.path)
    before = society_paths(config, run, iteration - 1) or {}  # the weights each member has now
    start = before if config.finetune.init_from == "previous" else {}
    jobs, trained = [], {}
    lora = config.finetune.adapter == "lora"
    for unit in train_units(method, config.debate.agents):
        init = resolve_model_path(start[unit.members[0]]) if start else base
        # LoRA: every adapter trains on the frozen base; init_from previous continues the agent's own adapter.
        init, init_adapter = (base, init if is_adapter(init) else None) if lora else (init, None)
        data = run.dataset_path(iteration, unit.name)
        if data.stat().st_size == 0:
            # Nothing agreed with the majority (or the label): the unit keeps its weights this iteration.
            keeps = init_adapter or init
            logger.warning("iteration %d: %s has no finetuning examples; it keeps %s", iteration, unit.name, keeps)
            trained[unit.name] = keeps
            continue
        out = run.agent_dir(iteration, unit.name)
        jobs.append(FinetuneJob(unit.name, init, str(data), str(out),
                                training_spec(config, unit.role, iteration, unit.index), iteration=iteration,
                                init_adapter=init_adapter))
        trained[unit.name] = str(out)
    # Members no unit trains (the critics of "w/o critic") keep their weights.
    kept = {m: resolve_model_path(before.get(m, base)) for m in society_members(config.debate.agents, False)}
    society = society_after(method, config.debate.agents, trained, kept)
    logger.info("iteration %d: %d finetunes (%s)", iteration, len(jobs), ", ".join(j.name for j in jobs))
    results = runtime.finetune(jobs, config.finetune, str(run.ray_train_dir(iteration)))
    write_json_atomic(results, run.finetunes_path(iteration))
    write_json_atomic(society, run.society_path(iteration))  # last: marks the stage done
    return results


# -- evaluation (Algorithm 2) and diversity ---------------------------------------------------------------


def evaluate_society(runtime: Runtime, config: Config, run: RunDir, task: Task, problems: Sequence[Problem],
                     iteration: int, model_paths: Mapping[Member, str] | None) -> dict[str, Any]:
    """Society ``iteration`` debates ``problems``; score it and write iter_<l>/metrics.json."""
    done = debate_split(runtime, config, run, iteration, "eval", problems, model_paths)
    records = read_records(run.debate_dir(iteration, "eval"))
    metrics = {"iteration": iteration, "task": config.task.name, "agents": config.debate.agents,
               **evaluate_records(records, problems, task, seed=config.seed)}
    metrics.update(_cached_diversity(runtime, config, run, iteration, task, records, problems, model_paths,
                                     reuse=bool(done.get("skipped_all"))))
    write_json_atomic(metrics, run.metrics_path(iteration))
    logger.info("iteration %d: accuracy %.3f ± %.3f over %d problems (consensus %.3f, answer-frequency KL %s, "
                "embedding dissimilarity %s, critic NLL %s, base NLL %s) -> %s", iteration, metrics["accuracy"],
                metrics["stderr"], metrics["problems"], metrics["consensus"], _fmt(metrics["answer_freq_kl"]),
                _fmt(metrics["embedding_dissimilarity"]), _fmt(metrics["critic_nll"]), _fmt(metrics["base_nll"]),
                run.metrics_path(iteration))
    return metrics


HELDOUT_CRITIC = Member(CRITIC, 0)  # the critic whose model scores the other critics' responses (critic_nll)


def diversity_metrics(runtime: Runtime, config: Config, task: Task, records: pa.Table,
                      problems: Sequence[Problem],
                      model_paths: Mapping[Member, str] | None = None) -> dict[str, Any]:
    """Consensus-free diversity figures of one evaluation debate (``mft_ray.metrics.diversity``), flat for
    metrics.json. ``model_paths`` are the evaluated society's weights (None: every member is the base).

    Answer-frequency KL over every problem; embedding dissimilarity over the first
    ``metrics.embedding_problems`` problems; over the first ``metrics.nll_problems``, the NLL of critics
    1..N-1's final responses under critic 0's model (``critic_nll``, the paper's held-out critic) and of
    every final response under ``metrics.nll_model`` (``base_nll``, default the base model: drift from the
    base). A metric that cannot be computed here (no encoder package, an engine that cannot score, no
    second critic) is None and its reason is logged and kept under ``diversity_details.skipped``.
    """
    m = config.metrics
    ids = [p.id for p in problems]
    out: dict[str, Any] = {"answer_freq_kl": diversity.answer_kl(records, task.equivalent, m.kl_smoothing, ids),
                           "embedding_dissimilarity": None, "critic_nll": None, "base_nll": None}
    details: dict[str, Any] = {"kl_smoothing": m.kl_smoothing, "kl_problems": len(ids), "skipped": {}}
    critic_path = (model_paths or {}).get(HELDOUT_CRITIC, config.model.path)
    critic_config = dataclasses.replace(config, metrics=dataclasses.replace(m, nll_model=critic_path))
    # metric -> (its scorer's config, the agents whose final responses it scores; None = every agent)
    wanted: dict[str, tuple[Config, list[int] | None]] = {}
    if m.nll_problems == 0:
        details["skipped"]["base_nll"] = details["skipped"]["critic_nll"] = "metrics.nll_problems is 0"
    else:
        wanted["base_nll"] = (config, None)
        if config.debate.agents < 2 or config.debate.rounds < 2:
            details["skipped"]["critic_nll"] = "needs 2 or more critics answering (debate.agents and rounds >= 2)"
        elif config.model.engine == "openai":
            details["skipped"]["critic_nll"] = "engine 'openai' cannot score text"
        else:
            wanted["critic_nll"] = (critic_config, list(range(1, config.debate.agents)))
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
    # One scorer at a time, one per distinct model (at iteration 0 critic 0 is the base model): two at once
    # could not both be placed on a one-GPU node, nor share its memory.
    by_model: dict[str, list[str]] = {}
    for name, (scorer_config, _) in wanted.items():
        by_model.setdefault(resolve_model_path(scorer_config.metrics.nll_model or config.model.path), []).append(name)
    chosen = ids[:m.nll_problems]
    for path, names in by_model.items():
        try:
            scorer = runtime.heldout_scorer(wanted[names[0]][0])
        except EngineError as exc:
            logger.warning("%s", exc)
            details["skipped"].update(dict.fromkeys(names, str(exc)))
            continue
        try:
            for name in names:
                conversations, completions, keys = diversity.nll_requests(records, chosen, wanted[name][1])
                try:
                    scores = scorer.score(conversations, completions)
                except EngineError as exc:  # ScoringNotSupported included: a metric never fails the evaluation
                    reason = one_line(exc)
                    logger.warning("%s", reason)
                    details["skipped"][name] = reason
                    continue
                summary = diversity.summarize_nll(scores, keys)
                out[name] = summary.pop("nll")
                details[name] = {"model": path, "problems": len(chosen), **summary}
        finally:
            scorer.close()
    out["diversity_details"] = details
    return out


def _diversity_settings(config: Config, problem_ids: Sequence[str]) -> dict[str, Any]:
    """What the diversity figures depend on besides the records: cached figures are reused only if equal."""
    return {**dataclasses.asdict(config.metrics), "base_model": config.model.path, "engine": config.model.engine,
            "problems": hashlib.sha256("\n".join(problem_ids).encode()).hexdigest()[:16]}


def _cached_diversity(runtime: Runtime, config: Config, run: RunDir, iteration: int, task: Task,
                      records: pa.Table, problems: Sequence[Problem], model_paths: Mapping[Member, str] | None,
                      reuse: bool) -> dict[str, Any]:
    """``diversity_metrics``, or the figures saved in diversity.json when the records were not redone
    (``reuse``) and the settings match: a resumed run neither reloads the encoder nor restarts the scorer."""
    path = run.diversity_path(iteration)
    settings = {**_diversity_settings(config, [p.id for p in problems]),
                "heldout_critic": (model_paths or {}).get(HELDOUT_CRITIC, config.model.path)}
    saved = run.read_diversity(iteration) if reuse else None
    if saved is not None and saved.get("settings") == settings:
        logger.info("diversity metrics reused from %s", path)
        return saved["metrics"]
    metrics = diversity_metrics(runtime, config, task, records, problems, model_paths)
    write_json_atomic({"settings": settings, "metrics": metrics}, path)
    return metrics


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


# -- the run's summary -----------------------------------------------------------------------------------


def update_summary(run: RunDir, config: Config, entry: dict[str, Any], origin: Mapping[str, Any]) -> dict[str, Any]:
    """Merge one evaluation ``entry`` into <run_dir>/metrics.json, keeping what was recorded for that
    iteration (its datasets and finetunes) and every other iteration."""
    summary = run.read_summary() or {}
    summary.update({"task": config.task.name, "method": config.method,
                    "agents": config.debate.agents, "rounds": config.debate.rounds, **origin})
    entries = {e["iteration"]: e for e in summary.get("iterations", [])}
    entries[entry["iteration"]] = {**entries.get(entry["iteration"], {}), **entry}
    summary["iterations"] = [entries[k] for k in sorted(entries)]
    write_json_atomic(summary, run.summary_path)
    return summary
