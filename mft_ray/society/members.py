"""Who is in the society and which engine serves whom (pure planning, no Ray).

Members are named by role and index: generator n, critic n (n = 0..N-1) and one summarizer. Members
with the same weights can share one engine: at iteration 0 every member is the base model, so a
shared plan loads it once instead of 2N+1 times.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GENERATOR, CRITIC, SUMMARIZER = "generator", "critic", "summarizer"


@dataclass(frozen=True, order=True)
class Member:
    role: str
    index: int

    def __str__(self) -> str:
        return self.role if self.role == SUMMARIZER else f"{self.role}_{self.index}"


@dataclass
class EngineGroup:
    """One engine (one actor) and the members it serves."""

    model_path: str
    members: list[Member] = field(default_factory=list)

    def describe(self) -> str:
        return f"{', '.join(str(m) for m in self.members)} <- {self.model_path}"


def society_members(agents: int, summarize: bool) -> list[Member]:
    members = [Member(GENERATOR, n) for n in range(agents)] + [Member(CRITIC, n) for n in range(agents)]
    if summarize:
        members.append(Member(SUMMARIZER, 0))
    return members


def plan_engines(members: list[Member], model_paths: dict[Member, str], share_engine: bool) -> list[EngineGroup]:
    """Group members into engines: one per distinct model path if sharing, else one per member."""
    if not share_engine:
        return [EngineGroup(model_paths[m], [m]) for m in members]
    groups: dict[str, EngineGroup] = {}
    for m in members:
        path = model_paths[m]
        groups.setdefault(path, EngineGroup(path)).members.append(m)
    return list(groups.values())
