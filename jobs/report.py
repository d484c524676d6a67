"""Report over one or more run directories: a Markdown report with the paper's Table 1 grid and figures.

    python -m jobs.report --run-dir runs/maft_arith [--run-dir runs/saft_arith ...] [--out DIR]

Writes DIR/report.md (``mft_ray.reports.paper_report``: Table 1, Figures 1, 3, 4, 5 and per-run tables).
DIR defaults to <run-dir>/report for one run; with several runs --out is required. A missing run directory
or metrics file exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from jobs.common import run_cli
from mft_ray.reports.paper_report import write_paper_report


def main(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> dict[str, Any]:
    """Write report.md and the figures for ``run_dirs`` into ``out``; return their paths."""
    return write_paper_report(run_dirs, out)


def cli(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--run-dir", action="append", required=True, metavar="DIR",
                        help="a run directory (metrics.json + config.yaml); repeat for several runs")
    parser.add_argument("--out", metavar="DIR", help="where report.md and the figures go "
                        "(default <run-dir>/report for one run; required for several)")
    args = parser.parse_args(argv)
    result = main(args.run_dir, args.out)
    print(f"report: {result['report']}")
    for path in result["figures"].values():
        print(f"figure: {path}")


if __name__ == "__main__":
    sys.exit(run_cli(cli))
