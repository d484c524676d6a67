"""Shared plumbing of the job entry points: argument parsing, logging, Ray start-up, error exits."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Sequence

from mft_ray.config import BUILTIN_PREFIX, Config, load_config
from mft_ray.errors import MftError, one_line, root_cause
from mft_ray.models.builtin import resolve_model_path

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


def build_builtin_model(path: str) -> str:
    """Build (or find cached) a ``builtin:`` model here, in the job's driver, with every core it may use;
    return its local directory (any other ``path`` unchanged, as ``resolve_model_path`` does).

    Left to the first agent actor, the build ran on one thread: Ray gives a fractional-CPU actor
    ``OMP_NUM_THREADS=1``, which made the testbed's ~9-minute build take ~17 (measured on 2 CPUs). Actors
    on this node then find it cached; on other nodes they build the same (deterministic) model themselves.
    """
    if not path.startswith(BUILTIN_PREFIX):
        return path
    import torch  # here: the other jobs' commands start faster without it

    threads = torch.get_num_threads()
    # A job's entrypoint may inherit OMP_NUM_THREADS=1 from Ray as well.
    torch.set_num_threads(max(threads, len(os.sched_getaffinity(0))))
    try:
        return resolve_model_path(path)
    finally:
        torch.set_num_threads(threads)


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
