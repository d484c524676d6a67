"""STaR's rationalization pass (Zelikman et al. 2022), the one stage that reads ground-truth labels.

``jobs.iterate`` runs it for ``method=star`` only, between the finetune-split debate and the datasets:
every round-1 reply whose answer is wrong is re-asked, through the same agent actors (the generator
that wrote it), with the true answer as a hint; ``mft_ray.finetune_sets.star_examples`` then keeps the
rationalizations that reach the label. The labels are handed in by the caller (``finetune_labels``) and
go nowhere else: into the hinted prompts and ``iter_<l>/star_rationalizations.jsonl``, never into the
debate records or any other method's path.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from typing import Any, Sequence

from mft_ray.config import Config
from mft_ray.finetune_sets import star_requests
from mft_ray.methods import prompt_set
from mft_ray.records import read_records, write_jsonl_atomic
from mft_ray.rundir import RunDir
from mft_ray.society import GENERATOR, Member
from mft_ray.tasks import Problem, Task

logger = logging.getLogger("mft_ray.jobs.star")


def finetune_labels(problems: Sequence[Problem]) -> dict[str, str]:
    """Problem id -> ground-truth answer of the finetune split: STaR's labels, read here and only here."""
    return {p.id: p.answer for p in problems}


def rationalizations_path(run: RunDir, iteration: int):
    return run.iteration_dir(iteration) / "star_rationalizations.jsonl"


def _read_saved(path, expected: int) -> list[dict[str, Any]] | None:
    """The saved rationalizations, or None when the file is not one whole answer per wrong round-1 reply."""
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return rows if len(rows) == expected else None


def rationalize(config: Config, run: RunDir, task: Task, iteration: int, problems: Sequence[Problem],
                labels: dict[str, str], model_paths: dict[Member, str] | None) -> list[dict[str, Any]]:
    """Re-ask society ``iteration-1`` every wrong round-1 answer of its finetune debate with the label as
    a hint; write and return ``[{"problem_id", "agent", "messages", "response"}]`` (skipped if written)."""
    from actors.generate import generate_with_society

    path = rationalizations_path(run, iteration)
    records = read_records(run.debate_dir(iteration - 1, "finetune"))
    wrong = star_requests(records, labels, task.is_correct)
    if path.is_file():
        saved = _read_saved(path, len(wrong))
        if saved is not None:
            logger.info("iteration %d: STaR rationalizations already written (%s)", iteration, path)
            return saved
        logger.warning("%s is truncated or corrupt (an earlier crash?): redoing it", path)
    questions = {p.id: p.question for p in problems}
    prompts = prompt_set(config)
    requests: dict[str, list] = defaultdict(list)
    keys: dict[str, list[str]] = defaultdict(list)
    for pid, n in wrong:
        member = str(Member(GENERATOR, n))
        requests[member].append([{"role": "user", "content": prompts.rationalize(questions[pid], labels[pid])}])
        keys[member].append(pid)
    logger.info("iteration %d: STaR re-asks %d wrong round-1 answers with the true answer as a hint",
                iteration, len(wrong))
    replies = generate_with_society(config, model_paths, requests, (iteration - 1, "finetune", "rationalize"),
                                    name=f"society-iter{iteration - 1}-rationalize") if wrong else {}
    rows = [{"problem_id": pid, "agent": int(member.rsplit("_", 1)[1]), "messages": conv, "response": text}
            for member in sorted(requests)
            for pid, conv, text in zip(keys[member], requests[member], replies[member])]
    write_jsonl_atomic(rows, path)
    return rows
