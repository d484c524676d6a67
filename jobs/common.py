"""Shared plumbing of the job entry points: argument parsing, logging, Ray start-up, error exits."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from mft_ray.config import Config, load_config
from mft_ray.errors import MftError, one_line, root_cause

logger = logging.getLogger("mft_ray.jobs")


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config file (see jobs/configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="dotted overrides applied after the config file, e.g. debate.agents=5")
    return parser


def parse_config(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run a job's CLI; known errors print one clear line and exit non-zero, never a traceback dump.

    The exit code is the error's own (``mft_ray.errors``: 2 bad input, 3 resources the cluster cannot
    provide, 4 a model that cannot be loaded or served, 5 a finetune failed for good). Unexpected errors
    keep their traceback.
    """
    setup_logging()
    try:
        main(argv)
    except Exception as exc:
        cause = root_cause(exc)  # out of Ray's wrappers: the agent's own error
        if not isinstance(cause, MftError):
            raise
        print(f"error: {one_line(cause)}", file=sys.stderr)
        return cause.exit_code
    return 0
