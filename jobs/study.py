"""A study: several methods on one config, each in its own run directory, compared in one table.

    python -m jobs.study --config jobs/configs/demo_cpu.yaml [--methods multiagent_ft,majority_ft]
                         [--root DIR] [key.sub=value ...]

Runs (or resumes) Algorithm 1 (``mft_ray.algorithm``, as jobs.iterate does) once per method under
DIR/<method> (DIR defaults to the config's run_dir) with the same config, seeds and problems, then writes
into DIR:

- ``results.json``: one row per method and iteration, ``{"method", "label", "iteration", "accuracy",
  "stderr", "samples_per_problem", "vs_best_se"}`` (``mft_ray.reports.study``);
- ``study.md``: that table, linking the multi-run report written into DIR/report
  (``mft_ray.reports.paper_report``, as jobs.report): Figure 1 (accuracy per iteration, society vs
  single model), Figure 3 (diversity per iteration) and the per-run tables.

Every run resumes where it stopped, so a long study may be run in parts. Prints the table.

Iteration 0 is the base model for every method, so a run whose iteration-0 debate of a split would be
another run's (same settings, seeds and problems: Multiagent FT and Single-agent FT on both splits) starts
from a copy of it instead of debating it again (``mft_ray.run.reuse``; ``--no-reuse`` turns that off).
``--reuse-from DIR`` also offers the runs of another study, e.g. the full-finetune study to its LoRA twin.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from actors.runtime import connect_ray
from jobs.common import run_cli
from mft_ray.algorithm import run_algorithm
from mft_ray.config import load_config
from mft_ray.errors import ConfigError
from mft_ray.methods.registry import get_method
from mft_ray.reports.paper_report import load_run, write_paper_report
from mft_ray.reports.study import results_json, study_markdown, study_rows
from mft_ray.run.files import write_json_atomic, write_text_atomic
from mft_ray.run.reuse import reuse_iteration0
from mft_ray.run.rundir import RunDir

logger = logging.getLogger("mft_ray.jobs.study")

DEFAULT_METHODS = ("multiagent_ft", "majority_ft")
RESULTS = "results.json"
STUDY = "study.md"


def main(config_path: str | None, overrides: Sequence[str], methods: Sequence[str],
         root: str | Path | None = None, reuse: bool = True,
         reuse_from: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Run every method of the study (each resumes), then write results.json and study.md into ``root``.
    With ``reuse``, a run starts from the iteration-0 debates it shares with another run of the study or of
    the studies in ``reuse_from``."""
    if not methods:
        raise ConfigError("--methods: give at least one method")
    for name in methods:
        get_method(name)  # an unknown name is refused before any work
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods: a method is given twice in {list(methods)}")
    if any(o.split("=", 1)[0] in ("method", "run_dir") for o in overrides):
        raise ConfigError("method and run_dir are set by the study (--methods, --root), not as overrides")
    first = load_config(config_path, [*overrides, f"method={methods[0]}"])
    out = Path(root if root is not None else first.run_dir).expanduser().absolute()
    configs = {name: load_config(config_path, [*overrides, f"method={name}", f"run_dir={out / name}"])
               for name in methods}
    others = _other_studies_runs(reuse_from) if reuse else []
    for name in methods:
        logger.info("study: method %s in %s", name, out / name)
        config = configs[name]
        if reuse:  # each source judged by the config it last ran with, which may be an earlier launch's
            for source in [out / m for m in methods if m != name] + others:
                reuse_iteration0(config, source)
        run_algorithm(config, partial(connect_ray, keep_societies=True))
    runs = {name: load_run(out / name) for name in methods}
    rows = study_rows(runs)
    write_json_atomic(results_json(rows), out / RESULTS)
    problems = next(iter(runs.values())).iterations[0].get("problems")
    table = study_markdown(rows, problems)
    figures = write_paper_report([out / name for name in methods], out / "report")
    text = (f"# Study: {', '.join(methods)}\n\n{table}\n"
            f"Figures and per-run tables: [report/report.md](report/report.md) "
            f"({', '.join(sorted(p.name for p in figures['figures'].values()))}).\n")
    write_text_atomic(text, out / STUDY)
    logger.info("wrote %s and %s", out / RESULTS, out / STUDY)
    return {"rows": rows, "table": table, "root": str(out)}


def _other_studies_runs(roots: Sequence[str | Path]) -> list[Path]:
    """The run directories (those with a saved config) of each study directory in ``roots``."""
    found = []
    for root in roots:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise ConfigError(f"--reuse-from {root}: no such directory")
        found += [d for d in sorted(root.iterdir()) if RunDir(d).config_path.is_file()]
    return found


def cli(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--config", help="YAML config file (see jobs/configs/)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated methods (default {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--root", help="directory of the study's runs (default: the config's run_dir)")
    parser.add_argument("--no-reuse", action="store_true",
                        help="debate every run's iteration 0 itself, even where another run has the same debate")
    parser.add_argument("--reuse-from", action="append", default=[], metavar="DIR",
                        help="another study's directory whose runs' iteration-0 debates may be reused (repeatable)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args(argv)
    result = main(args.config, args.overrides, [m for m in args.methods.split(",") if m], args.root,
                  reuse=not args.no_reuse, reuse_from=args.reuse_from)
    print(result["table"])
    print(f"(also in {Path(result['root']) / STUDY} and {Path(result['root']) / RESULTS})")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(run_cli(cli))
