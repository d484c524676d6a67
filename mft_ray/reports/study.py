"""A study: several methods run on one config (``jobs.study``), compared in one table as the paper compares
them on one task (Table 1), each scored the way the paper scores it.

Rows, each with accuracy ± standard error on the evaluation split and the answers it sampled per problem:

- Base (1), Majority (N) and Debate (N x M) at iteration 0: from runs of those evaluation-only methods
  when the study has them, else from the iteration-0 evaluation of the ``multiagent_ft`` run (its round-1
  records give one sample and the vote over N samples);
- Majority at the debate's budget (N x M samples), from a ``majority_matched`` run;
- every finetuned method at each iteration >= 1 (STaR also as one sample of its final model).

``vs_best_se`` is each row's distance from the best row that is not Multiagent FT (any baseline at any
iteration), in standard errors of the difference: a claim is made against the strongest baseline, never
against Debate alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from mft_ray.reports.tables import METHOD_ORDER, Run, evaluation_of, method_title

OURS = "multiagent_ft"


def _row(method: str, label: str, iteration: int, accuracy: float, stderr: float, samples: int | None,
         run: Run) -> dict[str, Any]:
    return {"method": method, "label": label, "iteration": iteration, "accuracy": accuracy, "stderr": stderr,
            "samples_per_problem": samples, "run": run.name}


def _shape(run: Run) -> tuple[int | None, int | None]:
    """(agents, rounds) of the run's evaluation society, as metrics.json recorded them."""
    evaluate = (run.summary.get("method_info") or {}).get("evaluate") or {}
    return evaluate.get("agents", run.summary.get("agents")), evaluate.get("rounds", run.summary.get("rounds"))


def study_rows(runs: Mapping[str, Run]) -> list[dict[str, Any]]:
    """The study's rows (module docstring), baselines first, then each finetuned method per iteration."""
    rows: list[dict[str, Any]] = []
    # Iteration 0 of a run scored by the debate: its round 1 holds one sample and N samples per problem.
    source = runs.get(OURS) or next((r for r in runs.values()
                                     if not r.evaluation_only and evaluation_of(r.summary) == "debate"), None)
    if source is not None:
        n, m = _shape(source)
        zero = source.iteration(0)
        if "base" not in runs:
            rows.append(_row("base", method_title("base"), 0, zero["base_accuracy"], zero["base_stderr"], 1, source))
        if "majority" not in runs:
            rows.append(_row("majority", f"Majority ({n} samples)", 0, zero["majority_accuracy"],
                             zero["majority_stderr"], n, source))
        if "debate" not in runs:
            rows.append(_row("debate", "Debate (iteration 0)", 0, zero["accuracy"], zero["stderr"],
                             n * m if n and m else None, source))
    for name, run in runs.items():
        if run.evaluation_only:
            n, m = _shape(run)
            zero = run.iteration(0)
            label = method_title(name, run.summary) + (" (iteration 0)" if name == "debate" else "")
            rows.append(_row(name, label, 0, zero["accuracy"], zero["stderr"], n * m if n and m else None, run))
    for name in sorted((k for k, r in runs.items() if not r.evaluation_only),
                       key=lambda k: METHOD_ORDER.index(k) if k in METHOD_ORDER else len(METHOD_ORDER)):
        run = runs[name]
        n, m = _shape(run)
        title = method_title(name, run.summary)
        for e in run.iterations:
            if e["iteration"] == 0:
                continue
            rows.append(_row(name, f"{title} (iteration {e['iteration']})", e["iteration"], e["accuracy"],
                             e["stderr"], n * m if n and m else None, run))
            if name == "star":  # the final model's single sample as well as its vote
                rows.append(_row(name, f"{title}, one sample (iteration {e['iteration']})", e["iteration"],
                                 e["base_accuracy"], e["base_stderr"], 1, run))
    baselines = [r for r in rows if r["method"] != OURS]
    best = max(baselines, key=lambda r: r["accuracy"], default=None)
    for r in rows:
        if best is None:
            r["vs_best_se"] = None
            continue
        se = math.hypot(r["stderr"], best["stderr"])
        r["vs_best_se"] = (r["accuracy"] - best["accuracy"]) / se if se > 0 else 0.0
    for r in rows:
        r["best_baseline"] = best is not None and r is best
    return rows


def study_markdown(rows: list[dict[str, Any]], problems: int | None = None) -> str:
    """The rows as a Markdown table (accuracy in %), the best baseline marked."""
    best = next((r for r in rows if r["best_baseline"]), None)
    lines = ["| Method | Samples / problem | Accuracy ± SE | vs best baseline (SE) |", "|---|---|---|---|"]
    for r in rows:
        vs = "–" if r["vs_best_se"] is None or r["best_baseline"] else f"{r['vs_best_se']:+.1f}"
        label = f"**{r['label']}** (best baseline)" if r["best_baseline"] else r["label"]
        samples = "–" if r["samples_per_problem"] is None else str(r["samples_per_problem"])
        lines.append(f"| {label} | {samples} | {100 * r['accuracy']:.1f} ± {100 * r['stderr']:.1f} | {vs} |")
    note = (f"Accuracy ± standard error (%) on {problems} evaluation problems. " if problems else
            "Accuracy ± standard error (%). ")
    if best is not None:
        note += (f"'vs best baseline' = (accuracy - {best['label']}'s) / the standard error of the difference; "
                 "every row but Multiagent FT counts as a baseline.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def results_json(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows as ``results.json`` holds them."""
    return [{"method": r["method"], "label": r["label"], "iteration": r["iteration"], "accuracy": r["accuracy"],
             "stderr": r["stderr"], "samples_per_problem": r["samples_per_problem"],
             "vs_best_se": r["vs_best_se"]} for r in rows]
