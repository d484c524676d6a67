"""The report's figures (PNG, matplotlib's Agg backend: files only, never a display).

Numbered as in the paper: Figure 1 accuracy per finetuning iteration (Multiagent FT against Single-agent
FT, or whichever runs are given), Figure 3 diversity per iteration, Figure 4 accuracy against diversity,
Figure 5 zero-shot transfer. Each function returns the path it wrote, or None when the runs hold nothing
to draw (e.g. no transfer run), so that the report says so instead of showing an empty plot.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from mft_ray.reports.tables import DIVERSITY_METRICS, Run, metric, task_title, transfer_bars
from mft_ray.run.files import atomic_path

logger = logging.getLogger(__name__)

FIGURE1 = "figure1_accuracy.png"
FIGURE3 = "figure3_diversity.png"
FIGURE4 = "figure4_accuracy_vs_diversity.png"
FIGURE5 = "figure5_transfer.png"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    """Write via a temporary name and rename: a figure is complete or absent."""
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    _plt().close(fig)
    return out


def _label(run: Run, runs: Sequence[Run]) -> str:
    """Method title, plus the task when runs of several tasks share a panel, plus the run name if still ambiguous."""
    label = run.title
    if run.transfer:
        label += f" ({task_title(run.finetune_task)} -> {task_title(run.task)})"
    elif len({(r.task, r.finetune_task) for r in runs}) > 1:
        label += f" ({task_title(run.task)})"
    if sum(1 for r in runs if (r.title, r.task, r.finetune_task) == (run.title, run.task, run.finetune_task)) > 1:
        label += f" [{run.name}]"
    return label


def run_colors(runs: Sequence[Run]) -> dict[str, str]:
    """One matplotlib color per run (by its directory, in the order given), the same in every panel and figure:
    a panel that only some runs have data for (the critic NLL: only debate-scored runs) still shows each run in
    its own color, not the next of the cycle."""
    paths = list(dict.fromkeys(str(r.path) for r in runs))
    return {path: f"C{i % 10}" for i, path in enumerate(paths)}


def _integer_x(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def figure1_accuracy(runs: Sequence[Run], path: str | Path) -> Path | None:
    """Accuracy ± SE per finetuning iteration, one panel per dataset, one line per run (transfer runs excluded)."""
    own = [r for r in runs if not r.transfer and not r.evaluation_only]
    if not own:
        return None
    tasks = sorted({r.task for r in own})
    colors = run_colors(own)
    plt = _plt()
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 3.9), dpi=120, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        here = [r for r in own if r.task == task]
        for r in here:
            its = r.iterations
            ax.errorbar([e["iteration"] for e in its], [100 * e["accuracy"] for e in its],
                        yerr=[100 * e["stderr"] for e in its], marker="o", capsize=4, label=_label(r, here),
                        color=colors[str(r.path)])
        ax.set_title(f"{task_title(task)}: accuracy per finetuning iteration")
        ax.set_xlabel("finetuning iteration (0 = the untrained society)")
        ax.set_ylabel("accuracy (%)")
        ax.set_xticks(sorted({e["iteration"] for r in here for e in r.iterations}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def figure3_diversity(runs: Sequence[Run], path: str | Path) -> Path | None:
    """Each diversity metric per iteration (one panel each), one line per run; a panel says when no run has it."""
    own = [r for r in runs if not r.evaluation_only]
    if not own:
        return None
    colors = run_colors(own)
    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), dpi=120)
    for ax in axes.flat[len(DIVERSITY_METRICS):]:
        ax.set_visible(False)
    for ax, (key, label) in zip(axes.flat, DIVERSITY_METRICS):
        drawn = False
        for r in own:
            points = [(e["iteration"], metric(e, key)) for e in r.iterations if metric(e, key) is not None]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=_label(r, own),
                        color=colors[str(r.path)])
                drawn = True
        ax.set_title(label)
        ax.set_xlabel("finetuning iteration")
        _integer_x(ax)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, "not computed in these runs", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("Diversity of the society's final responses per finetuning iteration")
    fig.tight_layout()
    return _save(fig, path)


def figure4_accuracy_vs_diversity(runs: Sequence[Run], path: str | Path) -> Path | None:
    """Accuracy against each diversity metric that some run has: one point per (run, iteration), labelled l."""
    own = [r for r in runs if not r.evaluation_only]
    metrics = [(k, lab) for k, lab in DIVERSITY_METRICS if any(metric(e, k) is not None for r in own for e in r.iterations)]
    if not metrics:
        return None
    colors = run_colors(own)
    plt = _plt()
    cols = min(2, len(metrics))
    rows = (len(metrics) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.4 * cols, 3.9 * rows), dpi=120, squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    for ax, (key, label) in zip(axes.flat, metrics):
        for r in own:
            points = [(metric(e, key), 100 * e["accuracy"], e["iteration"]) for e in r.iterations
                      if metric(e, key) is not None]
            if not points:
                continue
            ax.scatter([p[0] for p in points], [p[1] for p in points], label=_label(r, own), color=colors[str(r.path)])
            for x, y, it in points:
                ax.annotate(str(it), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("Accuracy against diversity (numbers: finetuning iteration)")
    fig.tight_layout()
    return _save(fig, path)


def figure5_transfer(runs: Sequence[Run], path: str | Path) -> Path | None:
    """Zero-shot transfer: for each run evaluated on another task than it was finetuned on, bars of accuracy
    ± SE for the base society (if its iteration 0 was evaluated there) and each transferred society."""
    transfer = [r for r in runs if r.transfer]
    if not transfer:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(transfer), figsize=(max(4.8, 1.3 * max(len(transfer_bars(r)) for r in transfer))
                                                        * len(transfer), 4.2), dpi=120, squeeze=False)
    for ax, r in zip(axes[0], transfer):
        bars = transfer_bars(r)
        xs = range(len(bars))
        heights = [100 * b[1] for b in bars]
        drawn = ax.bar(xs, heights, yerr=[100 * b[2] for b in bars], capsize=4,
                       color=["#9e9e9e" if b[0] in ("Base", "Majority", "Debate") else "#1f77b4" for b in bars])
        ax.bar_label(drawn, labels=[f"{h:.1f}" for h in heights], padding=2, fontsize=8)
        ax.set_ylim(0, max(10.0, max(100 * (b[1] + b[2]) for b in bars) * 1.15))
        ax.set_xticks(list(xs))
        ax.set_xticklabels([b[0] for b in bars], rotation=25, ha="right", fontsize=8)
        ax.set_ylabel(f"accuracy on {task_title(r.task)} (%)")
        ax.set_title(f"finetuned on {task_title(r.finetune_task)} -> {task_title(r.task)}")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Zero-shot transfer")
    fig.tight_layout()
    return _save(fig, path)


def write_figures(runs: Sequence[Run], out_dir: str | Path) -> dict[str, Path | None]:
    """All four figures into ``out_dir``: {file name: path written, or None if there was nothing to draw}."""
    out = Path(out_dir)
    made = {FIGURE1: figure1_accuracy(runs, out / FIGURE1), FIGURE3: figure3_diversity(runs, out / FIGURE3),
            FIGURE4: figure4_accuracy_vs_diversity(runs, out / FIGURE4), FIGURE5: figure5_transfer(runs, out / FIGURE5)}
    logger.info("figures: %s", ", ".join(f"{k}={'written' if v else 'nothing to draw'}" for k, v in made.items()))
    return made
