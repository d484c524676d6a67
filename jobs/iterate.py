"""Multiagent finetuning for L iterations (Algorithm 1), then evaluation of every society (Algorithm 2).

    python -m jobs.iterate --config jobs/configs/tiny_cpu.yaml [key.sub=value ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.iterate --config jobs/configs/tiny_cpu.yaml run_dir=/abs/path/run

Runs ``mft_ray.algorithm`` (Algorithm 1, then Algorithm 2 on every society; ``method=<name>`` for a baseline
or ablation) on Ray. Rerunning the same command after a crash resumes where it stopped.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import Any, Sequence

from actors.runtime import connect_ray
from jobs.common import base_parser, parse_config, run_cli
from mft_ray.algorithm import run_algorithm
from mft_ray.config import Config


def main(config: Config) -> dict[str, Any]:
    """Run (or resume) Algorithm 1 for ``config`` on Ray (started, or joined, once the checks that need no
    cluster have passed); returns the run's summary (also <run_dir>/metrics.json)."""
    return run_algorithm(config, partial(connect_ray, keep_societies=True))


def cli(argv: Sequence[str] | None = None) -> None:
    args = base_parser(__doc__.strip().splitlines()[0]).parse_args(argv)
    summary = main(parse_config(args))
    print(summary["table"])
    print(f"(also in {summary['report']})")


if __name__ == "__main__":
    sys.exit(run_cli(cli))
