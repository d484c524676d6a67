"""Who is in the society and which engine serves whom (pure planning, no Ray).

Members are named by role and index: generator n, critic n (n = 0..N-1) and one summarizer. Members
with the same weights can share one engine: at iteration 0 every member is the base model, so a
shared plan loads it once instead of 2N+1 times.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

GENERATOR, CRITIC, SUMMARIZER = "generator", "critic", "summarizer"


@dataclass(frozen=True, order=True)
class Member:
    role: str
    index: int

    def __str__(self) -> str:
        return self.role if self.role == SUMMARIZER else f"{self.role}_{self.index}"


@dataclass
class EngineGroup:
    """One engine (one actor) and the members it serves; ``adapters`` maps a member to the LoRA adapter it
    answers with over ``model_path`` (members not in it answer with the model itself)."""

    model_path: str
    members: list[Member] = field(default_factory=list)
    adapters: dict[Member, str] = field(default_factory=dict)

    def describe(self) -> str:
        adapted = f" (+{len(self.adapters)} LoRA adapters)" if self.adapters else ""
        return f"{', '.join(str(m) for m in self.members)} <- {self.model_path}{adapted}"


def _whole(path: str) -> tuple[str, str | None]:
    return path, None


def society_members(agents: int, summarize: bool) -> list[Member]:
    members = [Member(GENERATOR, n) for n in range(agents)] + [Member(CRITIC, n) for n in range(agents)]
    if summarize:
        members.append(Member(SUMMARIZER, 0))
    return members


def plan_engines(members: list[Member], model_paths: dict[Member, str], share_engine: bool,
                 split: Callable[[str], tuple[str, str | None]] = _whole) -> list[EngineGroup]:
    """Group members into engines: one per distinct base model if sharing, else one per member.

    ``split`` turns a member's weights into (base model, LoRA adapter or None); members whose weights are
    adapters of one base (a ``finetune.adapter: lora`` society) share that base's engine, each with its own
    adapter. By default every path is a whole model.
    """
    groups: dict[str, EngineGroup] = {}
    planned = []
    for m in members:
        base, adapter = split(model_paths[m])
        group = groups.setdefault(base, EngineGroup(base)) if share_engine else EngineGroup(base)
        if not share_engine or not group.members:
            planned.append(group)
        group.members.append(m)
        if adapter is not None:
            group.adapters[m] = adapter
    return planned
