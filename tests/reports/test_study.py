"""The study table (mft_ray.reports.study) on hand-made runs, and jobs.study's refusals before any work."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from mft_ray.reports.study import results_json, study_markdown, study_rows
from mft_ray.reports.tables import Run
from tests.conftest import REPO


def _run(method: str, agents: int, rounds: int, *iterations: dict) -> Run:
    summary = {"method": method, "task": "arithmetic", "agents": agents, "rounds": rounds,
               "method_info": {"name": method, "evaluate": {"agents": agents, "rounds": rounds}},
               "iterations": list(iterations)}
    return Run(Path(f"/runs/{method}"), summary)


def _it(iteration: int, acc: float, se: float = 0.02, base: float | None = None) -> dict:
    e = {"iteration": iteration, "accuracy": acc, "stderr": se, "problems": 500}
    if base is not None:
        e.update(base_accuracy=base, base_stderr=0.02)
    return e


def _runs() -> dict[str, Run]:
    zero = {**_it(0, 0.50, base=0.40), "majority_accuracy": 0.60, "majority_stderr": 0.02}
    return {
        "multiagent_ft": _run("multiagent_ft", 3, 2, zero, _it(1, 0.70), _it(2, 0.72)),
        "majority_ft": _run("majority_ft", 3, 1, _it(0, 0.60, base=0.40), _it(1, 0.66, base=0.5), _it(2, 0.64, base=0.5)),
        "star": _run("star", 3, 1, _it(0, 0.60, base=0.40), _it(1, 0.63, base=0.55)),
        "majority_matched": _run("majority_matched", 6, 1, _it(0, 0.62, base=0.41)),
    }


def test_rows_score_each_method_as_the_paper_does_against_the_best_baseline() -> None:
    rows = study_rows(_runs())
    got = [(r["label"], r["iteration"], r["accuracy"], r["samples_per_problem"]) for r in rows]
    assert got == [
        ("Base", 0, 0.40, 1), ("Majority (3 samples)", 0, 0.60, 3), ("Debate (iteration 0)", 0, 0.50, 6),
        ("Majority (N x M samples)", 0, 0.62, 6),
        ("STaR (iteration 1)", 1, 0.63, 3), ("STaR, one sample (iteration 1)", 1, 0.55, 1),
        ("Majority FT (iteration 1)", 1, 0.66, 3), ("Majority FT (iteration 2)", 2, 0.64, 3),
        ("Multiagent FT (iteration 1)", 1, 0.70, 6), ("Multiagent FT (iteration 2)", 2, 0.72, 6),
    ]
    # The strongest baseline is Majority FT at iteration 1, not Debate: every distance is from it.
    best = [r for r in rows if r["best_baseline"]]
    assert [r["label"] for r in best] == ["Majority FT (iteration 1)"]
    last = rows[-1]
    assert last["vs_best_se"] == pytest.approx((0.72 - 0.66) / math.hypot(0.02, 0.02))
    assert best[0]["vs_best_se"] == 0.0 and all(r["vs_best_se"] <= 0 for r in rows if r["method"] != "multiagent_ft")


def test_markdown_and_results_json_hold_the_same_rows() -> None:
    rows = study_rows(_runs())
    text = study_markdown(rows, 500)
    assert "| **Majority FT (iteration 1)** (best baseline) | 3 | 66.0 ± 2.0 | – |" in text
    assert "| Multiagent FT (iteration 2) | 6 | 72.0 ± 2.0 | +2.1 |" in text
    assert "on 500 evaluation problems" in text
    saved = results_json(rows)
    assert [set(r) for r in saved] == [{"method", "label", "iteration", "accuracy", "stderr", "samples_per_problem",
                                        "vs_best_se"}] * len(rows)
    assert [(r["method"], r["iteration"]) for r in saved][:3] == [("base", 0), ("majority", 0), ("debate", 0)]


def test_evaluation_only_runs_give_their_own_rows() -> None:
    runs = _runs()
    runs["base"] = _run("base", 1, 1, _it(0, 0.42, base=0.42))
    rows = study_rows(runs)
    assert [r["label"] for r in rows if r["method"] == "base"] == ["Base"]
    assert next(r for r in rows if r["method"] == "base")["accuracy"] == 0.42  # the base run, not iteration 0's


@pytest.mark.parametrize("args, message", [
    (["--methods", "ours"], "method must be one of"),
    (["--methods", "majority_ft,majority_ft"], "given twice"),
    (["--methods", "majority_ft", "run_dir=/tmp/x"], "set by the study"),
    (["--methods", "majority_ft", "--reuse-from", "/nonexistent/study"], "--reuse-from /nonexistent/study: no such"),
])
def test_study_refuses_bad_methods_before_any_work(tmp_path, args, message) -> None:
    root = tmp_path / "study"
    proc = subprocess.run([sys.executable, "-m", "jobs.study", "--root", str(root), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr
    assert not root.exists()
