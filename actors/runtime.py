"""The stages' ``Runtime`` on Ray: what ``mft_ray.stages`` asks of the cluster, done with actors.

Each call places what it needs (a ``SocietyGroup``, Ray Train workers), uses it and releases it, so the
stages stay free of Ray and a test can hand them a fake runtime instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from typing import Any, Mapping, Sequence

import ray

from actors.finetune import check_finetunes_fit, run_finetunes
from actors.group import SocietyGroup
from mft_ray.config import Config, FinetuneConfig
from mft_ray.engines import Conversation, SamplingParams
from mft_ray.errors import EngineError, PlacementError, root_cause
from mft_ray.society.members import Member
from mft_ray.tasks import Problem
from mft_ray.training.spec import FinetuneJob

logger = logging.getLogger(__name__)

HELDOUT = "heldout"  # the held-out scorer's one member


class RayHeldoutScorer:
    """The held-out model (``metrics.nll_model``, default the base model) in a one-member group, placed like
    any agent. Once placed it loads in the background, so the driver's embedding work overlaps the load."""

    def __init__(self, config: Config) -> None:
        model, path = config.model, config.metrics.nll_model or config.model.path
        if model.engine == "openai":
            if config.metrics.nll_model is None:
                raise EngineError("held-out NLL skipped: engine 'openai' cannot score text; set "
                                  "metrics.nll_model to a local checkpoint, or metrics.nll_problems=0")
            model = dataclasses.replace(model, engine="hf")  # a local checkpoint next to a served society
        self.timeout_s = config.resources.placement_timeout_s
        self.deadline = time.monotonic() + self.timeout_s  # placement and loading share one time limit
        try:
            # No restarts: a scorer that crashed (e.g. out of memory) would crash again; the metric is skipped.
            # Named by its model: an evaluation may hold two at once (critic NLL and base NLL).
            name = f"heldout-scorer-{hashlib.sha256(path.encode()).hexdigest()[:8]}"
            self.group = SocietyGroup(config, {HELDOUT: path}, name=name, members=[HELDOUT],
                                      model=model, wait=False, max_restarts=0)
        except PlacementError as exc:
            raise EngineError(f"held-out NLL skipped: the scoring actor cannot be placed: {exc}") from exc

    def score(self, conversations: Sequence[Conversation], completions: Sequence[str]) -> list[float | None]:
        """Mean per-token NLL of each completion (``Engine.score``); EngineError if it cannot be had."""
        try:
            # Bounded like a society's placement: a scorer the cluster cannot start is skipped, not waited for.
            self.group.wait_ready(max(0.0, self.deadline - time.monotonic()))
            return ray.get(self.group.async_score(HELDOUT, conversations, completions))
        except ray.exceptions.GetTimeoutError as exc:
            raise EngineError(f"held-out NLL skipped: the scoring actor did not start within "
                              f"{self.timeout_s:.0f}s (resources.placement_timeout_s)") from exc
        except EngineError as exc:
            raise root_cause(exc) from None  # the scorer's own error (e.g. ScoringNotSupported), not Ray's wrapper
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            # E.g. out of memory while scoring: the debate and its other metrics are worth keeping.
            raise EngineError(f"held-out NLL skipped: scoring failed: {str(exc).splitlines()[-1]}") from exc

    def close(self) -> None:
        self.group.shutdown()


class RayRuntime:
    """``mft_ray.stages.Runtime`` on the Ray cluster this process is connected to."""

    def debate(self, config: Config, iteration: int, split: str, problems: Sequence[Problem], out_dir: str,
               model_paths: Mapping[Member, str] | None = None) -> dict[str, Any]:
        """Debate ``problems`` with a society (placed, loaded, then released); write records to ``out_dir``.

        Only ids and question texts reach the actors: ground-truth answers never leave the driver.
        """
        with SocietyGroup(config, model_paths, name=f"society-iter{iteration}-{split}") as group:
            return ray.get(group.async_debate(iteration, split, [(p.id, p.question) for p in problems], str(out_dir)))

    def generate(self, config: Config, model_paths: Mapping[Member, str] | None,
                 requests: Mapping[str, Sequence[Conversation]], seed_parts: Sequence[object],
                 name: str = "society-generate") -> dict[str, list[str]]:
        """Member name -> one reply per conversation in ``requests[member]``, in order.

        Each member's call is seeded by (sampling.seed, *seed_parts, member), so a rerun reproduces it.
        Members without conversations get an empty list and no call.
        """
        wanted = {m: list(c) for m, c in requests.items() if c}
        if not wanted:
            return {m: [] for m in requests}
        with SocietyGroup(config, model_paths, name=name) as group:
            base = SamplingParams.from_config(config.sampling)
            refs = {m: group.async_generate(m, convs, base.derive(*seed_parts, m)) for m, convs in wanted.items()}
            logger.info("%s: %d conversations for %s", name, sum(map(len, wanted.values())), ", ".join(wanted))
            replies = {m: ray.get(ref) for m, ref in refs.items()}
        return {m: replies.get(m, []) for m in requests}

    def heldout_scorer(self, config: Config) -> RayHeldoutScorer:
        return RayHeldoutScorer(config)

    def check_finetunes_fit(self, finetune: FinetuneConfig) -> None:
        check_finetunes_fit(finetune.num_workers, finetune.cpus_per_worker, finetune.gpus_per_worker)

    def finetune(self, jobs: Sequence[FinetuneJob], finetune: FinetuneConfig, storage_path: str) -> dict[str, Any]:
        return run_finetunes(list(jobs), storage_path, finetune.num_workers, finetune.cpus_per_worker,
                             finetune.gpus_per_worker, finetune.max_failures, finetune.max_concurrent,
                             together=finetune.adapter == "lora" and finetune.adapters_together)


# A local Ray's raylet waits a hard-coded 15 s for its dashboard agent to write its ports and aborts after
# that (ray-project/ray#65983, open on Ray 2.60); ray.init then gives up 30 s later with this message. Seen on
# a 2-core machine under load (CI); a second start, once the load has moved on, works.
LOCAL_START_ATTEMPTS = 3
_START_TIMEOUT = "timed out during startup"


def start_local_ray(**init_kwargs: Any) -> None:
    """``ray.init(**init_kwargs)`` of a new local instance, started again (up to LOCAL_START_ATTEMPTS in all)
    when its raylet died during start-up; any other failure, or the last attempt's, is raised as it is."""
    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        try:
            ray.init(**init_kwargs)
            return
        except Exception as exc:
            if _START_TIMEOUT not in str(exc) or attempt == LOCAL_START_ATTEMPTS:
                raise
            logger.warning("the local Ray instance did not start (%s; its raylet likely gave up waiting for its "
                           "dashboard agent, ray-project/ray#65983): starting it again (attempt %d of %d)",
                           str(exc).split(".")[0], attempt + 1, LOCAL_START_ATTEMPTS)
            ray.shutdown()
            time.sleep(attempt)


def init_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS (set by `ray job submit`), else start a local one."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        # A throwaway local instance: token auth set up by a local ray.init() would only break later
        # CLI calls on this machine. A cluster's own auth mode (RAY_ADDRESS set) is left alone.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        start_local_ray(log_to_driver=True, include_dashboard=False)
    logger.info("ray: %s", ray.cluster_resources())


def connect_ray() -> RayRuntime:
    """Start (or join) Ray and return the stages' runtime on it: what a job passes to ``run_algorithm``."""
    init_ray()
    return RayRuntime()
