"""The stages' ``Runtime`` on Ray: what ``mft_ray.stages`` asks of the cluster, done with actors.

Each call places what it needs (a ``SocietyGroup``, Ray Train workers), uses it and releases it, so the
stages stay free of Ray and a test can hand them a fake runtime instead. A runtime made with
``keep_societies`` (``jobs.iterate``) keeps the last society placed until a call needs another society, the
held-out scorer or the finetunes, or ``release``: a society that evaluates and then debates the finetune
split (the same weights) is placed and loaded once, when no held-out NLL is scored between the two.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ray

from actors.finetune import check_finetunes_fit, run_finetunes
from actors.group import SocietyGroup
from mft_ray.config import Config, FinetuneConfig
from mft_ray.engines import Conversation, SamplingParams
from mft_ray.errors import EngineError, PlacementError, root_cause
from mft_ray.methods.registry import prompt_set
from mft_ray.society.members import Member, society_members
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


def society_key(config: Config, model_paths: Mapping[Member, str] | None) -> str:
    """What a placed society is made of (its members' weights, model and resource settings, prompts): two
    calls with the same key can be served by the same ``SocietyGroup``."""
    members = society_members(config.debate.agents, config.debate.summarize)
    paths = {str(m): (model_paths or {}).get(m, config.model.path) for m in members}
    return json.dumps([dataclasses.asdict(config.model), dataclasses.asdict(config.resources), paths,
                       repr(prompt_set(config))], sort_keys=True, default=str)


class RayRuntime:
    """``mft_ray.stages.Runtime`` on the Ray cluster this process is connected to. ``keep_societies``: keep the
    last society placed between calls (see the module's docstring); ``release`` frees it."""

    def __init__(self, keep_societies: bool = False) -> None:
        self.keep_societies = keep_societies
        self._kept: tuple[str, SocietyGroup] | None = None

    @contextlib.contextmanager
    def _society(self, config: Config, model_paths: Mapping[Member, str] | None, name: str) -> Iterator[SocietyGroup]:
        """The society for ``config`` and ``model_paths``: the kept one if it is that society, else a new one
        (released after the call unless societies are kept; a call that fails releases it)."""
        key = society_key(config, model_paths)
        if self._kept is not None and self._kept[0] == key:
            logger.info("%s: the society placed as %s serves it too", name, self._kept[1].name)
            group = self._kept[1]
        else:
            self.release()
            group = SocietyGroup(config, model_paths, name=name)
            if self.keep_societies:
                self._kept = (key, group)
        try:
            yield group
        except BaseException:
            group.shutdown()
            self._kept = None
            raise
        if not self.keep_societies:
            group.shutdown()

    def release(self) -> None:
        """Shut down the kept society, if any."""
        if self._kept is not None:
            self._kept[1].shutdown()
            self._kept = None

    def debate(self, config: Config, iteration: int, split: str, problems: Sequence[Problem], out_dir: str,
               model_paths: Mapping[Member, str] | None = None) -> dict[str, Any]:
        """Debate ``problems`` with a society (placed and loaded, or the kept one); write records to ``out_dir``.

        Only ids and question texts reach the actors: ground-truth answers never leave the driver.
        """
        with self._society(config, model_paths, f"society-iter{iteration}-{split}") as group:
            return ray.get(group.async_debate(iteration, split, [(p.id, p.question) for p in problems], str(out_dir),
                                              config=config))

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
        with self._society(config, model_paths, name) as group:
            base = SamplingParams.from_config(config.sampling)
            refs = {m: group.async_generate(m, convs, base.derive(*seed_parts, m)) for m, convs in wanted.items()}
            logger.info("%s: %d conversations for %s", name, sum(map(len, wanted.values())), ", ".join(wanted))
            replies = {m: ray.get(ref) for m, ref in refs.items()}
        return {m: replies.get(m, []) for m in requests}

    def heldout_scorer(self, config: Config) -> RayHeldoutScorer:
        self.release()  # a one-GPU node holds the society or the scorer, not both
        return RayHeldoutScorer(config)

    def check_finetunes_fit(self, finetune: FinetuneConfig) -> None:
        check_finetunes_fit(finetune.num_workers, finetune.cpus_per_worker, finetune.gpus_per_worker)

    def finetune(self, jobs: Sequence[FinetuneJob], finetune: FinetuneConfig, storage_path: str) -> dict[str, Any]:
        self.release()  # the finetunes need the society's resources
        return run_finetunes(list(jobs), storage_path, finetune.num_workers, finetune.cpus_per_worker,
                             finetune.gpus_per_worker, finetune.max_failures, finetune.max_concurrent,
                             together=finetune.adapter == "lora" and finetune.adapters_together)


# A local Ray's raylet waits a hard-coded 15 s for its dashboard agent to write its ports and aborts after
# that (ray-project/ray#65983, open on Ray 2.60); ray.init then gives up 30 s later with this message. Seen on
# a 2-core machine under load (CI): once three starts in a row failed while another job ran vLLM and Ray
# Train on both cores for minutes, so the starts are spaced out (10, 20, 30, 40 s between them) to outlast
# such a spell; a start once the load has moved on works.
LOCAL_START_ATTEMPTS = 5
_START_TIMEOUT = "timed out during startup"
_START_BACKOFF_S = 10.0


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
            time.sleep(_START_BACKOFF_S * attempt)


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


def connect_ray(keep_societies: bool = False) -> RayRuntime:
    """Start (or join) Ray and return the stages' runtime on it: what a job passes to ``run_algorithm``
    (``keep_societies``: see ``RayRuntime``)."""
    init_ray()
    return RayRuntime(keep_societies)
