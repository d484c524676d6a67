"""The report's figures, drawn from run summaries alone (no Ray, no model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mft_ray.reports import figures
from mft_ray.reports.tables import Run


def _run(path: Path, method: str, critic_nll: float | None) -> Run:
    entries = [{"iteration": i, "accuracy": 0.3 + 0.1 * i, "stderr": 0.02, "diversity": 0.4 - 0.1 * i,
                **({"critic_nll": critic_nll - 0.1 * i} if critic_nll is not None else {})} for i in (0, 1)]
    return Run(path, {"method": method, "task": "arithmetic", "iterations": entries})


@pytest.fixture()
def drawn(monkeypatch):
    """The figures each function drew, kept open instead of saved."""
    kept = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: kept.append(fig) or Path(path))
    yield kept
    for fig in kept:
        figures._plt().close(fig)


def test_each_run_keeps_its_color_in_a_panel_the_others_lack(tmp_path, drawn) -> None:
    # Majority FT has no critic NLL (one model, no critics): Single-agent FT's line there must not take
    # Majority FT's color, the next of matplotlib's cycle, as it did in the SmolLM2 study's Figure 3.
    runs = [_run(tmp_path / "multiagent_ft", "multiagent_ft", 0.5), _run(tmp_path / "majority_ft", "majority_ft", None),
            _run(tmp_path / "single_agent_ft", "single_agent_ft", 0.45)]
    colors = figures.run_colors(runs)
    assert len(set(colors.values())) == 3
    figures.figure3_diversity(runs, tmp_path / "f3.png")
    figures.figure1_accuracy(runs, tmp_path / "f1.png")
    fig3, fig1 = drawn
    by_title = {ax.get_title(): ax for ax in fig3.axes}
    lines = {line.get_label(): line.get_color() for line in by_title["Critic NLL under critic 0 (nats/token)"].lines}
    assert lines == {"Multiagent FT": colors[str(runs[0].path)], "Single-agent FT": colors[str(runs[2].path)]}
    everywhere = {line.get_label(): line.get_color() for line in by_title["Diversity (1 - consensus)"].lines}
    assert everywhere["Single-agent FT"] == lines["Single-agent FT"]
    accuracy = {c.get_label(): c.lines[0].get_color() for c in fig1.axes[0].containers}
    assert accuracy == {label: everywhere[label] for label in accuracy} and len(accuracy) == 3
