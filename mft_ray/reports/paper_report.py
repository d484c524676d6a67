"""The report over one or more run directories: the paper's Table 1 grid and Figures 1, 3, 4 and 5.

``write_paper_report`` reads each run's metrics.json (written by jobs.iterate / jobs.evaluate) and
config.yaml and writes <out>/report.md with: Table 1 (method x dataset, accuracy ± standard error, best in
bold), Figure 1 (accuracy per finetuning iteration), Figure 3 (diversity per iteration), Figure 4 (accuracy
against diversity), Figure 5 (zero-shot transfer: runs evaluated on another task than they were finetuned
on, made with ``jobs.evaluate --society-from``), and per-run tables. A missing or unreadable run directory
or metrics file is a ReportInputError naming it. (One run's own results table: ``run_report``.)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from mft_ray.errors import ConfigError, ReportInputError
from mft_ray.reports.figures import FIGURE1, FIGURE3, FIGURE4, FIGURE5, write_figures
from mft_ray.reports.tables import Run, run_markdown, table1_markdown, task_title, transfer_markdown
from mft_ray.run.files import write_text_atomic
from mft_ray.run.rundir import RunDir

logger = logging.getLogger(__name__)

REPORT_NAME = "report.md"


def load_run(run_dir: str | Path) -> Run:
    """One run directory's metrics.json and config.yaml; ReportInputError naming the path otherwise."""
    rundir = RunDir(run_dir)
    root, metrics, config = rundir.root, rundir.summary_path, rundir.config_path
    if not root.is_dir():
        raise ReportInputError(f"--run-dir: no such run directory: {root}")
    if not metrics.is_file():
        raise ReportInputError(f"{metrics} is missing: run jobs.iterate or jobs.evaluate on {root} first")
    try:
        summary = json.loads(metrics.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportInputError(f"{metrics} is not readable JSON: {exc}") from None
    if not config.is_file():
        raise ReportInputError(f"{config} is missing: {root} is not a complete run directory")
    try:
        saved = rundir.saved_config()
    except ConfigError as exc:
        raise ReportInputError(f"{config} is not readable YAML: {exc}") from None
    if not isinstance(summary, dict) or not isinstance(saved, dict):
        raise ReportInputError(f"{metrics} or {config} does not hold a mapping")
    try:
        run = Run(root, summary, saved)
        for e in run.iterations:  # the figures every table and plot needs
            for key in ("iteration", "accuracy", "stderr"):
                if not isinstance(e.get(key), (int, float)):
                    raise ValueError(f"an iteration entry has no {key!r}")
    except (ValueError, TypeError, KeyError) as exc:
        raise ReportInputError(f"{metrics}: {exc}") from None
    return run


def _unique_names(runs: list[Run]) -> None:
    """Runs are named by directory; two directories of one name are told apart by their parent."""
    for run in runs:
        if sum(1 for r in runs if r.path.name == run.path.name) > 1:
            run.name = f"{run.path.parent.name}/{run.path.name}"


def render(runs: list[Run], figures: dict[str, Path | None]) -> str:
    """The report's Markdown; figures are linked by file name (they sit next to report.md)."""
    def figure(name: str, caption: str, missing: str) -> str:
        return f"![{caption}]({name})\n" if figures.get(name) else f"_{missing}_\n"

    lines = ["# Multiagent finetuning report", "", "| Run | Method | Task | Finetuned on | Agents x rounds | "
             "Iterations | Directory |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        its = ", ".join(str(e["iteration"]) for e in r.iterations)
        lines.append(f"| {r.name} | {r.title} | {task_title(r.task)} | {task_title(r.finetune_task)} | "
                     f"{r.summary.get('agents', '?')} x {r.summary.get('rounds', '?')} | {its} | `{r.path}` |")
    sections = [
        "\n".join(lines) + "\n",
        "## Table 1: accuracy by method and dataset\n\n" + table1_markdown(runs),
        "## Figure 1: accuracy per finetuning iteration\n\n"
        + figure(FIGURE1, "accuracy per iteration", "No finetuned run on its own task given."),
        "## Figure 3: diversity per finetuning iteration\n\n"
        "Diversity = 1 - consensus (share of final answers that agree with the majority); answer-frequency KL = "
        "mean pairwise symmetric KL between the agents' smoothed answer frequencies over rounds; embedding "
        "dissimilarity = mean pairwise 1 - cosine of the final responses' sentence embeddings "
        "(all-MiniLM-L6-v2); critic NLL = mean per-token NLL of critics 1..N-1's final responses under "
        "critic 0's model (the paper's held-out critic); base NLL = the same for every final response under "
        "the base model (definitions in `mft_ray/metrics/diversity.py`).\n\n"
        + figure(FIGURE3, "diversity per iteration", "No run with diversity figures given."),
        "## Figure 4: accuracy against diversity\n\n"
        + figure(FIGURE4, "accuracy against diversity", "No run with diversity figures given."),
        "## Figure 5: zero-shot transfer\n\n" + transfer_markdown(runs) + "\n"
        + figure(FIGURE5, "zero-shot transfer", "No transfer run given, so no Figure 5."),
        "## Runs\n\n" + "\n".join(run_markdown(r) for r in runs),
    ]
    return "\n".join(sections)


def write_paper_report(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> dict[str, Any]:
    """Write report.md and the figures for ``run_dirs`` into ``out``; return their paths."""
    if not run_dirs:
        raise ReportInputError("give at least one --run-dir")
    runs = [load_run(d) for d in run_dirs]
    seen: set[Path] = set()
    for r in runs:
        if r.path in seen:
            raise ReportInputError(f"--run-dir {r.path} is given twice")
        seen.add(r.path)
    if out is None:
        if len(runs) > 1:
            raise ReportInputError("--out is required with several --run-dir")
        out = runs[0].path / "report"
    out_dir = Path(out).expanduser().absolute()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportInputError(f"--out {out_dir}: cannot create it: {exc.strerror or exc}") from None
    _unique_names(runs)
    figures = write_figures(runs, out_dir)
    for name, path in figures.items():
        if path is None:
            (out_dir / name).unlink(missing_ok=True)  # a figure of an earlier report of other runs
    report = out_dir / REPORT_NAME
    write_text_atomic(render(runs, figures), report)
    logger.info("wrote %s (%d runs)", report, len(runs))
    return {"report": report, "figures": {k: v for k, v in figures.items() if v is not None}, "runs": len(runs)}
