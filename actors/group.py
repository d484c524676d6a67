"""The society's actor group: one placement group, the agent actors in it, their calls and their teardown.

Every use of a society goes through ``SocietyGroup``: the batch debate and generation
(``actors.runtime``), the held-out scorer (a one-member group) and the interactive service (a detached
group). Calls are ``async_*`` methods that return ObjectRefs, so a caller can chain or gather them
without waiting on each; ``shutdown()`` (or leaving a ``with`` block) kills every actor and removes the
placement group.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any, Mapping, Sequence

import ray
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.agent import AgentActor
from actors.coordinator import DebateCoordinator
from actors.placement import place
from mft_ray.config import Config, ModelConfig
from mft_ray.engines import Conversation, SamplingParams
from mft_ray.methods.registry import prompt_set
from mft_ray.models.adapters import split_weights
from mft_ray.society.members import plan_engines, society_members

logger = logging.getLogger(__name__)


class SocietyGroup:
    """The agent actors of one society in one placement group. ``routes`` maps each member name to the
    actor serving it.

    ``model_paths`` gives each member's weights (default: every member uses ``config.model.path``, as at
    iteration 0). With ``resources.share_engine`` members with equal weights share an actor (one engine), and
    so do members whose weights are LoRA adapters of one base model (each request carries its adapter).
    ``members`` replaces the society's members (e.g. ``["heldout"]`` for the held-out scorer) and ``model``
    its model settings. ``detached=True`` (the interactive service) names the actors ``<name>-agent-<i>``
    and makes them and the placement group outlive the driver. ``wait=False`` returns before the models
    are loaded (``wait_ready`` then waits); by default load errors surface here, not mid-debate.
    ``max_restarts`` overrides the agent actor's restart policy (0: a crash is final).
    """

    def __init__(self, config: Config, model_paths: Mapping[Any, str] | None = None, *, name: str = "society",
                 detached: bool = False, members: Sequence[Any] | None = None, model: ModelConfig | None = None,
                 wait: bool = True, max_restarts: int | None = None) -> None:
        self.config = config
        self.name = name
        chosen = list(members) if members is not None else society_members(config.debate.agents,
                                                                               config.debate.summarize)
        paths = {m: (model_paths or {}).get(m, config.model.path) for m in chosen}
        res = config.resources
        groups = plan_engines(chosen, paths, res.share_engine, split_weights)
        shared = [g for g in groups if len(g.members) > 1]
        logger.info("%s: %d members on %d engine(s)%s", name, len(chosen), len(groups),
                    "".join(f"; shared engine: {g.describe()}" for g in shared))
        prompts = prompt_set(config)  # before placing: nothing to release if it fails
        bundle = {"CPU": res.num_cpus_per_agent, "GPU": res.num_gpus_per_agent}
        self.pg = place([bundle] * len(groups), res.placement_strategy, res.placement_timeout_s, name,
                        lifetime="detached" if detached else None)
        self.actor_names = [f"{name}-agent-{i}" for i in range(len(groups))] if detached else []
        self.actors: list[Any] = []
        self.coordinator: Any | None = None
        self._coordinator_settings: dict[str, Any] | None = None
        restarts = {} if max_restarts is None else {"max_restarts": max_restarts, "max_task_retries": 0}
        try:
            for i, group in enumerate(groups):
                named = {"name": self.actor_names[i], "lifetime": "detached"} if detached else {}
                self.actors.append(AgentActor.options(
                    num_cpus=res.num_cpus_per_agent, num_gpus=res.num_gpus_per_agent,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
                    **named, **restarts,
                ).remote(asdict(model or config.model), group.model_path, [str(m) for m in group.members], prompts,
                         {str(m): a for m, a in group.adapters.items()}))
            self.ready = [a.info.remote() for a in self.actors]
            if wait:
                self.wait_ready()
        except Exception:
            self.shutdown()
            raise
        self.paths = {str(m): p for m, p in paths.items()}  # member name -> weights
        self.routes = {str(m): a for g, a in zip(groups, self.actors) for m in g.members}

    def wait_ready(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Wait until every actor has loaded its model; raises its load error (or GetTimeoutError)."""
        return ray.get(self.ready, timeout=timeout_s)

    def actor(self, member: str) -> Any:
        """The actor serving ``member``; ValueError naming the members otherwise."""
        if member not in self.routes:
            raise ValueError(f"no such society member(s): {[member]}; members: {sorted(self.routes)}")
        return self.routes[member]

    # -- async_* calls: ObjectRefs, never waited on here -------------------------------------------------

    def async_generate(self, member: str, conversations: Sequence[Conversation],
                       sampling: SamplingParams) -> ray.ObjectRef:
        """``member`` answers each conversation (outside any debate)."""
        return self.actor(member).generate.remote(list(conversations), sampling, member)

    def async_score(self, member: str, conversations: Sequence[Conversation],
                    completions: Sequence[str]) -> ray.ObjectRef:
        """Mean per-token NLL of each completion under ``member``'s model."""
        return self.actor(member).score.remote(list(conversations), list(completions), member)

    def async_debate(self, iteration: int, split: str, problems: Sequence[tuple[str, str]],
                     out_dir: str, config: Config | None = None) -> ray.ObjectRef:
        """A debate of ``problems`` ([(id, question)]) by this society, driven by a coordinator actor that
        writes the shards under ``out_dir``; its statistics when done. ``config``: the debate's settings when
        not the group's own (a society kept for another stage); a coordinator for them replaces the last one."""
        settings = (config or self.config).to_dict()
        if self.coordinator is None or settings != self._coordinator_settings:
            if self.coordinator is not None:
                ray.kill(self.coordinator)
            self.coordinator = DebateCoordinator.remote(settings, self.routes)
            self._coordinator_settings = settings
        return self.coordinator.run.remote(iteration, split, list(problems), out_dir)

    # -- teardown ----------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Kill the coordinator and every agent actor; remove the placement group."""
        if self.coordinator is not None:
            ray.kill(self.coordinator)
            self.coordinator = None
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None

    def __enter__(self) -> SocietyGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

