"""Reports of a run directory: the results table (Markdown) and a plot of accuracy per iteration.

The rows follow the paper's comparison on one task: Base (one agent, one sample), Majority (N
independent samples, vote; both read from iteration 0's round-1 records), Debate (the untrained society,
iteration 0) and the run's method (Multiagent FT by default) after each finetuning iteration. Every
accuracy is the share of the evaluation split answered correctly, with its standard error
sqrt(p(1-p)/n). Below the table, the diversity figures of every iteration. Reports over several runs
(Table 1 grid, Figures 1-5) are ``paper_report``'s.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from mft_ray.reports.tables import DIVERSITY_METRICS, evaluation_of, fmt, method_title, metric
from mft_ray.run.files import atomic_path, write_text_atomic
from mft_ray.run.rundir import RunDir

logger = logging.getLogger(__name__)



def _examples(datasets: dict[str, Any] | None) -> tuple[int, int] | int | None:
    """(generator examples, critic examples) summed over agents from an iteration's counts.json, or the
    examples of the one shared model (single-model methods, whose counts hold no per-agent sets)."""
    if not datasets:
        return None
    agents = [v for k, v in datasets.items() if k.startswith("agent_")]
    trained = datasets.get("trained")
    if isinstance(trained, dict) and (not agents or "pooled" in datasets):
        return sum(trained.values())  # one model: what it trained on (the pooled set may have been cut)
    return sum(a["generator"] for a in agents), sum(a["critic"] for a in agents)


def result_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per method/iteration from ``<run_dir>/metrics.json`` (written by ``jobs.iterate``)."""
    iterations = sorted(summary["iterations"], key=lambda e: e["iteration"])
    if not iterations or iterations[0]["iteration"] != 0:
        raise ValueError("metrics.json has no iteration 0 (the debate baseline)")
    first = iterations[0]
    n = summary.get("agents", "N")
    title = method_title(summary.get("method") or "multiagent_ft", summary)
    evaluation = evaluation_of(summary)
    # Iteration 0 is the untrained society scored as this method is scored: a debate, a vote over N samples
    # (its round 1 is then the Majority row itself) or one sample.
    rows = [{"method": "Base (one sample)", "iteration": 0, "accuracy": first["base_accuracy"],
             "stderr": first["base_stderr"], "consensus": None, "examples": None}]
    if evaluation == "debate":
        rows.append({"method": f"Majority ({n} samples)", "iteration": 0, "accuracy": first["majority_accuracy"],
                     "stderr": first["majority_stderr"], "consensus": None, "examples": None})
    zero_title = {"debate": "Debate (iteration 0)", "samples": f"Majority ({n} samples, iteration 0)",
                  "single": "Base (iteration 0)"}[evaluation]
    for entry in iterations:
        it = entry["iteration"]
        rows.append({"method": zero_title if it == 0 else f"{title} (iteration {it})",
                     "iteration": it, "accuracy": entry["accuracy"], "stderr": entry["stderr"],
                     "consensus": entry["consensus"], "examples": _examples(entry.get("datasets"))})
    debate = next(r for r in rows if r["iteration"] == 0 and r["consensus"] is not None)
    for row in rows:
        # How far each row is from the untrained society, in standard errors of the difference of two accuracies.
        se = math.hypot(row["stderr"], debate["stderr"])
        row["vs_debate_se"] = (row["accuracy"] - debate["accuracy"]) / se if se > 0 else 0.0
    return rows


def markdown_table(summary: dict[str, Any]) -> str:
    """The results table as Markdown, with the evaluation split's size in the header line."""
    rows = result_rows(summary)
    problems = summary["iterations"][0].get("problems", "?")
    lines = [
        f"Task {summary.get('task', '?')}: {summary.get('agents', '?')} agents, {summary.get('rounds', '?')} "
        f"rounds, {problems} evaluation problems.",
        "",
        "| Method | Accuracy ± SE | vs iteration 0 (SE) | Consensus | Finetuning examples (generators / critics) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        cons = "–" if r["consensus"] is None else f"{r['consensus']:.3f}"
        ex = ("–" if r["examples"] is None else f"{r['examples']} (one model)" if isinstance(r["examples"], int)
              else f"{r['examples'][0]} / {r['examples'][1]}")
        vs = "–" if r["iteration"] == 0 and r["consensus"] is not None else f"{r['vs_debate_se']:+.1f}"
        lines.append(f"| {r['method']} | {100 * r['accuracy']:.1f} ± {100 * r['stderr']:.1f} | {vs} | {cons} | {ex} |")
    return "\n".join(lines) + "\n"


def diversity_table(summary: dict[str, Any]) -> str:
    """Diversity of the society's final responses per iteration (``mft_ray.metrics.diversity``), as Markdown."""
    lines = ["Diversity per iteration (definitions in mft_ray/metrics/diversity.py):", "",
             "| Iteration | Consensus | " + " | ".join(label for _, label in DIVERSITY_METRICS) + " |",
             "|---|---|" + "---|" * len(DIVERSITY_METRICS)]
    for e in sorted(summary["iterations"], key=lambda e: e["iteration"]):
        lines.append(f"| {e['iteration']} | {fmt(e.get('consensus'))} | "
                     + " | ".join(fmt(metric(e, key)) for key, _ in DIVERSITY_METRICS) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy(summary: dict[str, Any], path: str | Path) -> Path:
    """PNG: the society's accuracy per finetuning iteration (error bars = 1 SE), Base/Majority as lines."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    rows = result_rows(summary)
    title = method_title(summary.get("method") or "multiagent_ft", summary)
    society = [r for r in rows if r["iteration"] > 0 or r["consensus"] is not None]
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    ax.errorbar([r["iteration"] for r in society], [100 * r["accuracy"] for r in society],
                yerr=[100 * r["stderr"] for r in society], marker="o", capsize=4, label=f"{title} (society)")
    for r, style in zip([r for r in rows if r["consensus"] is None], ("--", ":")):
        ax.axhline(100 * r["accuracy"], linestyle=style, color="gray", label=r["method"])
    ax.set_xlabel("finetuning iteration (0 = Debate, untrained)")
    ax.set_ylabel("accuracy on the evaluation split (%)")
    ax.set_xticks([r["iteration"] for r in society])
    ax.set_title(f"{summary.get('task', '')}: {summary.get('agents', '?')} agents, {summary.get('rounds', '?')} rounds")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out


def write_report(run: RunDir, summary: dict[str, Any]) -> str:
    """Write the results table and the accuracy plot into the run directory; return the table."""
    table = markdown_table(summary)
    text = f"# Results\n\n{table}\n{diversity_table(summary)}\n![accuracy per iteration]({run.plot_path.name})\n"
    if run.plot_path.is_file() and run.report_path.is_file() and run.report_path.read_text() == text:
        return table  # a resumed, finished run: nothing changed, rewrite nothing
    write_text_atomic(text, run.report_path)
    plot_accuracy(summary, run.plot_path)
    logger.info("wrote %s and %s", run.report_path, run.plot_path)
    return table
