"""Start a society's agent actors inside one placement group, and tear them down."""

from __future__ import annotations

import logging
from dataclasses import asdict

import ray
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.agent import AgentActor
from actors.placement import place
from mft_ray.config import Config
from mft_ray.prompts import PromptSet
from mft_ray.society import Member, plan_engines, society_members

logger = logging.getLogger(__name__)


class SocietyActors:
    """The agent actors of one society. ``routes`` maps each member name to the actor serving it.

    ``model_paths`` gives each member's weights (default: every member uses ``config.model.path``,
    as at iteration 0). With ``resources.share_engine`` members with equal weights share an actor.
    ``detached=True`` (the interactive service) names the actors ``<name>-agent-<i>`` in the driver's
    namespace and makes them and the placement group outlive the driver; ``shutdown()`` ends them.
    """

    def __init__(self, config: Config, model_paths: dict[Member, str] | None = None,
                 name: str = "society", detached: bool = False) -> None:
        members = society_members(config.debate.agents, config.debate.summarize)
        paths = {m: (model_paths or {}).get(m, config.model.path) for m in members}
        groups = plan_engines(members, paths, config.resources.share_engine)
        res = config.resources
        shared = [g for g in groups if len(g.members) > 1]
        logger.info("%s: %d members on %d engine(s)%s", name, len(members), len(groups),
                    "".join(f"; shared engine: {g.describe()}" for g in shared))
        bundle = {"CPU": res.num_cpus_per_agent, "GPU": res.num_gpus_per_agent}
        self.pg = place([bundle] * len(groups), res.placement_strategy, res.placement_timeout_s, name,
                        lifetime="detached" if detached else None)
        self.actor_names = [f"{name}-agent-{i}" for i in range(len(groups))] if detached else []
        instruction = _prompts(config)
        self.actors = []
        try:
            for i, group in enumerate(groups):
                named = {"name": self.actor_names[i], "lifetime": "detached"} if detached else {}
                actor = AgentActor.options(
                    num_cpus=res.num_cpus_per_agent, num_gpus=res.num_gpus_per_agent,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
                    **named,
                ).remote(asdict(config.model), group.model_path, [str(m) for m in group.members], instruction)
                self.actors.append(actor)
            # Surfaces load errors (missing model, bad checkpoint) here rather than mid-debate.
            ray.get([a.info.remote() for a in self.actors])
        except Exception:
            self.shutdown()
            raise
        self.groups = groups
        self.routes = {str(m): a for g, a in zip(groups, self.actors) for m in g.members}

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None


def _prompts(config: Config) -> PromptSet:
    """The task's answer instruction in the prompt style of ``config.method``."""
    from mft_ray.methods import prompt_set

    return prompt_set(config)
