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


def preflight(config: Config) -> None:
    """Checks that need no cluster; jobs run them before touching the run directory or starting Ray."""
    from mft_ray.preflight import check_endpoint

    model = config.model
    if model.engine == "openai" and model.check_endpoint and model.base_url:
        check_endpoint(model.base_url, timeout_s=min(model.request_timeout_s, 10.0))


def build_builtin_model(path: str) -> str:
    """Build (or find cached) a ``builtin:`` model here, in the job's driver, with every core it may use;
    return its local directory (any other ``path`` unchanged, as ``resolve_model_path`` does).

    Left to the first agent actor, the build ran on one thread: Ray gives a fractional-CPU actor
    ``OMP_NUM_THREADS=1``, which made the testbed's ~9-minute build take ~17 (measured on 2 CPUs). Actors
    on this node then find it cached; on other nodes they build the same (deterministic) model themselves.
    """
    from mft_ray.config import BUILTIN_PREFIX

    if not path.startswith(BUILTIN_PREFIX):
        return path
    import torch

    from mft_ray.models import resolve_model_path

    threads = torch.get_num_threads()
    # A job's entrypoint may inherit OMP_NUM_THREADS=1 from Ray as well.
    torch.set_num_threads(max(threads, len(os.sched_getaffinity(0))))
    try:
        return resolve_model_path(path)
    finally:
        torch.set_num_threads(threads)


# Exit codes of run_cli: 2 bad input (config, data, records), 3 the cluster cannot hold the job,
# 4 a model could not be loaded or served (engine errors, an endpoint that fails for good),
# 5 a finetune failed for good (its Ray Train workers died more than finetune.max_failures times).
EXIT_INPUT, EXIT_RESOURCES, EXIT_ENGINE, EXIT_FINETUNE = 2, 3, 4, 5


def unwrap_ray_error(exc: BaseException) -> BaseException:
    """The error a remote task or actor raised, out of Ray's ``RayTaskError`` wrappers (nested ones too).

    Ray re-raises a remote error as a RayTaskError that also subclasses the original type; its text
    is the whole remote traceback, so the message of the original (``.cause``) is what to show.
    """
    ray_exceptions = sys.modules.get("ray.exceptions")
    for _ in range(16):  # wrappers nest once per hop (agent -> coordinator -> driver)
        if ray_exceptions is None or not isinstance(exc, ray_exceptions.RayTaskError):
            break
        cause = getattr(exc, "cause", None)
        if not isinstance(cause, BaseException) or cause is exc:
            break
        exc = cause
    return exc


def _exit_code(exc: BaseException) -> int | None:
    from mft_ray.engines.base import EngineError
    from mft_ray.records import RecordsError
    from mft_ray.tasks import DataError

    if isinstance(exc, (ConfigError, DataError, RecordsError)):
        return EXIT_INPUT
    if isinstance(exc, EngineError):
        return EXIT_ENGINE
    if "actors.placement" in sys.modules:  # only a job that got as far as placing actors can raise it
        from actors.placement import PlacementError

        if isinstance(exc, PlacementError):
            return EXIT_RESOURCES
    if "actors.finetune" in sys.modules:
        from actors.finetune import FinetuneError

        if isinstance(exc, FinetuneError):
            return EXIT_FINETUNE
    return None


def one_line(message: str) -> str:
    """A possibly multi-line error message as one line."""
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run a job's CLI; known errors print one clear line and exit non-zero, never a traceback dump.

    Exit codes: 2 bad input, 3 resources the cluster cannot provide, 4 engine failure, 5 a finetune
    failed for good (see EXIT_*).
    Unexpected errors keep their traceback.
    """
    setup_logging()
    try:
        main(argv)
    except Exception as exc:
        cause = unwrap_ray_error(exc)
        code = _exit_code(cause)
        if code is None:
            raise
        print(f"error: {one_line(str(cause))}", file=sys.stderr)
        return code
    return 0
