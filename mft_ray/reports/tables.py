"""Results across run directories: the paper's Table 1 grid, zero-shot transfer and per-run diversity tables.

A run is what ``jobs.iterate`` or ``jobs.evaluate`` left in one run directory: ``metrics.json`` (the
summary: task, method, iterations) and ``config.yaml``. This module turns already-loaded runs into
Markdown; ``mft_ray.reports.figures`` draws them and ``paper_report`` reads the files.

Table 1 (method x dataset): Base, Majority and Debate come from iteration 0 (a run of the evaluation-only
method of that name if one is given, else the first ``multiagent_ft`` run of the dataset, else the first
run of it): Base is one agent's round-1 answer, Majority the vote over the N round-1 answers, Debate the
untrained society's final majority. Every finetuning method contributes its final iteration. Each cell
is accuracy ± standard error in percent; the best accuracy of each column is in bold (ties all bold).
Runs evaluated on another task than they were finetuned on (zero-shot transfer) are kept out of the grid
and shown in their own table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mft_ray.methods.registry import METHODS

DEFAULT_METHOD = "multiagent_ft"
EVALUATION_ONLY = tuple(name for name, m in METHODS.items() if m.evaluation_only)
TASK_TITLES = {"arithmetic": "Arithmetic", "gsm8k": "GSM8K", "math": "MATH", "mmlu": "MMLU"}
# Row order of Table 1: baselines first, the paper's method last (as in the paper).
METHOD_ORDER = ("base", "majority", "majority_matched", "debate", "star", "majority_ft", "single_agent_ft_no_debate",
                "single_agent_ft", "single_agent_ft_unique_id", "single_agent_ft_high_temp", "cooperative_ft",
                "unique_id_ft", "multiagent_ft_no_summary", "multiagent_ft_no_critic", "multiagent_ft")
# Diversity figures of an iteration entry: (key, label).
DIVERSITY_METRICS = (("diversity", "Diversity (1 - consensus)"), ("answer_freq_kl", "Answer-frequency KL (nats)"),
                     ("embedding_dissimilarity", "Embedding dissimilarity (1 - cos)"),
                     ("critic_nll", "Critic NLL under critic 0 (nats/token)"),
                     ("base_nll", "NLL under the base model (nats/token)"))


# Keys of metrics.json entries written before the metrics were renamed (read as the new ones).
_OLD_KEYS = {"answer_freq_kl": "answer_kl", "base_nll": "heldout_nll"}


def metric(entry: dict[str, Any], key: str) -> Any:
    """``entry[key]``, or the same figure under its older name; None if absent."""
    value = entry.get(key)
    return entry.get(_OLD_KEYS[key]) if value is None and key in _OLD_KEYS else value


def evaluation_of(summary: dict[str, Any]) -> str:
    """How a run's societies were scored: "debate", "samples" or "single" (runs before the field: debate)."""
    return str((summary.get("method_info") or {}).get("evaluation") or "debate")


def method_title(name: str, summary: dict[str, Any] | None = None) -> str:
    """Display name of a method: the title the run recorded, the registry's, or the name made readable."""
    info = (summary or {}).get("method_info") or {}
    if info.get("title") and info.get("name", name) == name:
        return str(info["title"])
    if name in METHODS:
        return METHODS[name].title
    words = ["FT" if w.lower() == "ft" else w for w in name.split("_") if w] or ["?"]
    words[0] = words[0][:1].upper() + words[0][1:]
    return " ".join(words)


def task_title(name: str | None) -> str:
    return TASK_TITLES.get(name or "", name or "?")


def pct(acc: float, se: float) -> str:
    return f"{100 * acc:.1f} ± {100 * se:.1f}"


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


@dataclass
class Run:
    """One run directory's results (``summary`` = its metrics.json, ``config`` = its config.yaml)."""

    path: Path
    summary: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or self.path.name
        if not isinstance(self.summary.get("iterations"), list) or not self.summary["iterations"]:
            raise ValueError(f"{self.path / 'metrics.json'} holds no evaluated iteration")

    @property
    def method(self) -> str:
        return str(self.summary.get("method") or DEFAULT_METHOD)

    @property
    def title(self) -> str:
        return method_title(self.method, self.summary)

    @property
    def task(self) -> str:
        return str(self.summary.get("task") or (self.config.get("task") or {}).get("name") or "?")

    @property
    def finetune_task(self) -> str:
        """The task the society was finetuned on: another one for a zero-shot transfer evaluation."""
        return str(self.summary.get("finetune_task") or self.task)

    @property
    def transfer(self) -> bool:
        return self.finetune_task != self.task

    @property
    def iterations(self) -> list[dict[str, Any]]:
        return sorted(self.summary["iterations"], key=lambda e: e["iteration"])

    def iteration(self, number: int) -> dict[str, Any] | None:
        return next((e for e in self.iterations if e["iteration"] == number), None)

    @property
    def final(self) -> dict[str, Any]:
        return self.iterations[-1]

    @property
    def evaluation_only(self) -> bool:
        return self.method in EVALUATION_ONLY


def _method_rank(name: str) -> tuple[int, str]:
    # Unknown methods go just before multiagent_ft, alphabetically.
    return (METHOD_ORDER.index(name), "") if name in METHOD_ORDER else (len(METHOD_ORDER) - 1, name)


def _baseline_source(runs: list[Run], task: str) -> Run | None:
    """The run whose iteration 0 gives a dataset's derived Base / Majority / Debate figures."""
    # Only a run scored by the debate has Debate at iteration 0 (and N round-1 samples for Majority).
    candidates = [r for r in runs if r.task == task and not r.transfer and r.iteration(0) is not None
                  and not r.evaluation_only and evaluation_of(r.summary) == "debate"]
    preferred = [r for r in candidates if r.method == DEFAULT_METHOD]
    return (preferred or candidates or [None])[0]


def table1(runs: list[Run]) -> dict[str, Any]:
    """The grid: {"columns": [task], "rows": [{"label", "method", "cells": {task: cell}}]}.

    A cell is {"accuracy", "stderr", "run", "iteration", "best"}.
    """
    grid_runs = [r for r in runs if not r.transfer]
    tasks = sorted({r.task for r in grid_runs}, key=lambda t: (list(TASK_TITLES).index(t) if t in TASK_TITLES
                                                             else len(TASK_TITLES), t))
    rows: dict[str, dict[str, Any]] = {}

    def put(label: str, method: str, task: str, acc: float, se: float, run: Run, iteration: int) -> None:
        row = rows.setdefault(label, {"label": label, "method": method, "cells": {}})
        if task not in row["cells"]:  # the first run given wins
            row["cells"][task] = {"accuracy": acc, "stderr": se, "run": run.name, "iteration": iteration}

    for task in tasks:
        for r in grid_runs:
            if r.task == task and r.evaluation_only and r.iteration(0) is not None:
                e = r.iteration(0)
                put(method_title(r.method), r.method, task, e["accuracy"], e["stderr"], r, 0)
        source = _baseline_source(grid_runs, task)
        if source is not None:
            e = source.iteration(0)
            put(method_title("base"), "base", task, e["base_accuracy"], e["base_stderr"], source, 0)
            put(method_title("majority"), "majority", task, e["majority_accuracy"], e["majority_stderr"], source, 0)
            put(method_title("debate"), "debate", task, e["accuracy"], e["stderr"], source, 0)
    # Two runs of one method on one dataset (e.g. 3 and 5 agents) get a row each, named by run.
    count: dict[tuple[str, str], int] = {}
    for r in grid_runs:
        if not r.evaluation_only and r.final["iteration"] > 0:
            count[(r.method, r.task)] = count.get((r.method, r.task), 0) + 1
    for r in grid_runs:
        if r.evaluation_only or r.final["iteration"] == 0:
            continue
        label = r.title if count[(r.method, r.task)] == 1 else f"{r.title} [{r.name}]"
        put(label, r.method, r.task, r.final["accuracy"], r.final["stderr"], r, r.final["iteration"])
    ordered = sorted(rows.values(), key=lambda row: (_method_rank(row["method"]), row["label"]))
    for task in tasks:
        cells = [row["cells"][task] for row in ordered if task in row["cells"]]
        best = max((c["accuracy"] for c in cells), default=None)
        for c in cells:
            c["best"] = best is not None and abs(c["accuracy"] - best) < 1e-12
    return {"columns": tasks, "rows": ordered}


def table1_markdown(runs: list[Run]) -> str:
    """Table 1 as Markdown (best per column in bold), then which run and iteration fed each row."""
    grid = table1(runs)
    if not grid["columns"]:
        return "No run evaluated on the task it was finetuned on.\n"
    head = "| Method | " + " | ".join(task_title(t) for t in grid["columns"]) + " |"
    lines = [head, "|---|" + "---|" * len(grid["columns"])]
    for row in grid["rows"]:
        cells = []
        for task in grid["columns"]:
            c = row["cells"].get(task)
            text = "–" if c is None else pct(c["accuracy"], c["stderr"])
            cells.append(f"**{text}**" if c is not None and c["best"] else text)
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    lines += ["", "Accuracy ± standard error (%) on each evaluation split; best per column in bold. Sources:", ""]
    for row in grid["rows"]:
        where = "; ".join(f"{task_title(t)}: {c['run']} iteration {c['iteration']}" for t, c in row["cells"].items())
        lines.append(f"- {row['label']}: {where}")
    return "\n".join(lines) + "\n"


def transfer_markdown(runs: list[Run]) -> str:
    """One row per evaluated society of each zero-shot transfer run."""
    transfer = [r for r in runs if r.transfer]
    if not transfer:
        return ("No zero-shot transfer run given (evaluate a finetuned society on another task with "
                "`python -m jobs.evaluate ... --society-from RUN_DIR --iteration l`).\n")
    lines = ["| Finetuned on -> evaluated on | Society | Accuracy ± SE | Run |", "|---|---|---|---|"]
    for r in transfer:
        pair = f"{task_title(r.finetune_task)} -> {task_title(r.task)}"
        for label, acc, se in transfer_bars(r):
            lines.append(f"| {pair} | {label} | {pct(acc, se)} | {r.name} |")
    return "\n".join(lines) + "\n"


def transfer_bars(run: Run) -> list[tuple[str, float, float]]:
    """(label, accuracy, stderr) of a transfer run: the base society's figures if iteration 0 was evaluated,
    then the transferred society of every finetuned iteration."""
    out = []
    zero = run.iteration(0)
    if zero is not None:
        out += [("Base", zero["base_accuracy"], zero["base_stderr"]),
                ("Majority", zero["majority_accuracy"], zero["majority_stderr"]),
                ("Debate", zero["accuracy"], zero["stderr"])]
    for e in run.iterations:
        if e["iteration"] > 0:
            out.append((f"{run.title} (iter {e['iteration']})", e["accuracy"], e["stderr"]))
    return out


def run_markdown(run: Run) -> str:
    """Per-iteration accuracy and diversity of one run."""
    where = (f"finetuned on {task_title(run.finetune_task)}, evaluated on {task_title(run.task)}" if run.transfer
             else f"task {task_title(run.task)}")
    agents, rounds = run.summary.get("agents", "?"), run.summary.get("rounds", "?")
    lines = [f"### {run.name}: {run.title}, {where}", "",
             f"`{run.path}` — {agents} agents, {rounds} rounds.", "",
             "| Iteration | Accuracy ± SE | Consensus | " + " | ".join(label for _, label in DIVERSITY_METRICS) + " |",
             "|---|---|---|" + "---|" * len(DIVERSITY_METRICS)]
    for e in run.iterations:
        values = " | ".join(fmt(metric(e, key)) for key, _ in DIVERSITY_METRICS)
        lines.append(f"| {e['iteration']} | {pct(e['accuracy'], e['stderr'])} | {fmt(e.get('consensus'))} | {values} |")
    skipped = {k: v for e in run.iterations
               for k, v in ((e.get("diversity_details") or {}).get("skipped") or {}).items()}
    for name, why in sorted(skipped.items()):
        lines.append(f"\n{name} not computed: {why}")
    return "\n".join(lines) + "\n"
