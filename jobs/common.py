"""Shared plumbing of the job entry points: argument parsing, logging, Ray start-up, error exits."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Sequence

from mft_ray.config import Config, ConfigError, load_config

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


def init_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS (set by `ray job submit`), else start a local one."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        # A throwaway local instance: token auth set up by a local ray.init() would only break later
        # CLI calls on this machine. A cluster's own auth mode (RAY_ADDRESS set) is left alone.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address=address or None, log_to_driver=True, include_dashboard=False if not address else None)
    logger.info("ray: %s", ray.cluster_resources())


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run a job's CLI; known input errors print one clear line and exit 2, never a traceback dump."""
    from mft_ray.records import RecordsError
    from mft_ray.tasks import DataError

    setup_logging()
    try:
        main(argv)
    except (ConfigError, DataError, RecordsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from actors.placement import PlacementError

        if isinstance(exc, PlacementError):
            print(f"error: {exc}", file=sys.stderr)
            return 3
        raise
    return 0
