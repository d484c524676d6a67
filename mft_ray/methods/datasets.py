"""Per-agent finetuning sets from one iteration's debate records (Algorithm 1 lines 18-26).

With ŷ the final-round majority of a problem and a ≡ b the task's equivalence:

- D^G_n  = {(x, y[1,n]) : ans(y[1,n]) ≡ ŷ}: generator n learns only from its own round-1 replies.
- D^C-_n = {(x, trajectory_n) : ans(y[1,n]) ≢ ŷ and ans(y[M,n]) ≡ ŷ}  (corrected; an unparseable
  first answer counts as not ≡ ŷ)
- D^C+_n = {(x, trajectory_n) : ans(y[1,n]) ≡ ŷ and ans(y[M,n]) ≡ ŷ}  (kept right)
- D^C_n  = a mix with a share ``w`` from D^C-_n and ``1 - w`` from D^C+_n.

**Mixing rule** (seeded, per agent): with a = |D^C-| and b = |D^C+|,
- w = 1 takes all of D^C-, w = 0 all of D^C+;
- if both sides are non-empty, let T = floor(min(a / w, b / (1 - w))): the side that is scarcer
  relative to its share is kept whole and the other is subsampled without replacement to round(w T)
  (corrected) or T - round(w T) (kept) examples (so the mix has T examples, or T + 1 where rounding
  w T would otherwise have dropped one of the scarce side);
- if one side is empty the requested share cannot be met: the non-empty side is used whole (and the
  counts record this). The rule never fails and never invents examples.

Problems whose majority is None (no agent gave a parseable final answer) contribute nothing. No
ground truth is read anywhere here except by the STaR functions, which take the labels as an argument.

**STaR** (``star_examples``, the only rule here that reads ground truth, passed in explicitly): every
round-1 reply whose answer ≡ the label, plus, for each wrong or unparseable one, the rationalization the
model wrote when re-asked with the label as a hint, if its answer ≡ the label; a rationalization is
paired with the agent's *un-hinted* round-1 prompt.

A critic example is agent n's whole conversation (round-1 prompt, its round-1 reply, each critic
prompt and reply). Its round-1 reply carries ``"weight": 0`` (the OpenAI fine-tuning convention) so
that the loss covers only the critic turns (rounds 2..M): a critic is never trained on its own wrong
first answer.
"""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import pyarrow as pa

from mft_ray.methods.registry import SHARED_UNIT, Method, train_units
from mft_ray.society.members import CRITIC, GENERATOR
from mft_ray.society.voting import majority_vote, vote_rng

logger = logging.getLogger(__name__)

Example = dict[str, Any]  # {"problem_id": str, "messages": [{"role", "content", ["weight"]}, ...]}


@dataclass
class AgentSets:
    """The finetuning sets of one agent index n."""

    generator: list[Example] = field(default_factory=list)
    corrected: list[Example] = field(default_factory=list)  # D^C-
    kept: list[Example] = field(default_factory=list)  # D^C+
    critic: list[Example] = field(default_factory=list)  # the w-mix

    def counts(self) -> dict[str, int]:
        return {"generator": len(self.generator), "critic_corrected": len(self.corrected),
                "critic_kept": len(self.kept), "critic": len(self.critic)}


def mix(corrected: Sequence[Example], kept: Sequence[Example], w: float, rng: random.Random) -> list[Example]:
    """D^C = share ``w`` from ``corrected`` and ``1 - w`` from ``kept``; see the module docstring."""
    a, b = len(corrected), len(kept)
    if w >= 1 or b == 0:
        chosen_c, chosen_k = list(corrected), []
        if w < 1 and a:
            logger.info("critic mix: D^C+ is empty, using all %d D^C- examples (w=%.2f not met)", a, w)
    elif w <= 0 or a == 0:
        chosen_c, chosen_k = [], list(kept)
        if w > 0 and b:
            logger.info("critic mix: D^C- is empty, using all %d D^C+ examples (w=%.2f not met)", b, w)
    else:
        total = math.floor(min(a / w, b / (1 - w)) + 1e-9)
        # The scarcer side is kept whole even where round(w T) would drop one of its examples.
        if a / w <= b / (1 - w):
            n_c, n_k = a, min(b, total - round(w * total))
        else:
            n_c, n_k = min(a, round(w * total)), b
        chosen_c = rng.sample(list(corrected), n_c)
        chosen_k = rng.sample(list(kept), n_k)
    out = chosen_c + chosen_k
    rng.shuffle(out)
    return out


def _by_problem(records: pa.Table) -> dict[str, dict[tuple[str, int, int], dict]]:
    grouped: dict[str, dict[tuple[str, int, int], dict]] = defaultdict(dict)
    for r in records.to_pylist():
        grouped[r["problem_id"]][(r["role"], r["agent"], r["round"])] = r
    return grouped


def _conversation(row: dict) -> list[dict]:
    """The row's prompt messages plus its reply, as plain role/content dicts."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    msgs.append({"role": "assistant", "content": row["response"]})
    return msgs


def build_agent_sets(records: pa.Table, equivalent: Callable[[str, str], bool], agents: int, rounds: int,
                     w: float, seed: int) -> list[AgentSets]:
    """D^G_n, D^C-_n, D^C+_n and the mixed D^C_n for every agent n, from one debate's records."""
    sets = [AgentSets() for _ in range(agents)]

    def same(answer: str | None, majority: str) -> bool:
        return answer is not None and equivalent(majority, answer)

    first_role = "generator"
    final_role = "generator" if rounds == 1 else "critic"
    for pid, rows in sorted(_by_problem(records).items()):
        any_row = next(iter(rows.values()))
        majority = any_row["majority"]
        if majority is None:
            continue
        for n in range(agents):
            first = rows.get((first_role, n, 1))
            final = rows.get((final_role, n, rounds))
            if first is None or final is None:
                raise ValueError(f"problem {pid}: missing records for agent {n} (round 1 or {rounds})")
            first_ok = same(first["answer"], majority)
            if first_ok:
                sets[n].generator.append({"problem_id": pid, "messages": _conversation(first)})
            if rounds == 1 or not same(final["answer"], majority):
                continue
            messages = _conversation(final)
            # messages: user(prompt0), assistant(y1), user(critic prompt), assistant(y2), ...
            messages[1] = {**messages[1], "weight": 0}
            example = {"problem_id": pid, "messages": messages}
            (sets[n].kept if first_ok else sets[n].corrected).append(example)
    for n, s in enumerate(sets):
        s.critic = mix(s.corrected, s.kept, w, random.Random(f"{seed}:critic-mix:{n}"))
    return sets


def pooled(sets: Sequence[AgentSets]) -> list[Example]:
    """Single-agent FT data: every agent's generator and critic examples in one set."""
    return [ex for s in sets for ex in (*s.generator, *s.critic)]


def member_budget(examples: Sequence[Example], sets: Sequence[AgentSets], seed: int) -> list[Example]:
    """``examples`` cut to the mean size of one agent's generator set, drawn at random (seeded), in order.

    With the generator hyperparameters the single model then takes as many optimizer steps per iteration
    as one society generator: the pooled set alone is ~2N times larger at the same learning rate and
    epochs, which would compare more training with more models.
    """
    size = round(sum(len(s.generator) for s in sets) / max(1, len(sets)))
    if size >= len(examples):
        return list(examples)
    keep = sorted(random.Random(seed).sample(range(len(examples)), size))
    return [examples[i] for i in keep]


def majority_ft(records: pa.Table, equivalent: Callable[[str, str], bool], vote_seed: int) -> list[Example]:
    """Majority FT data: round-1 replies (independent samples, no debate) that agree with the
    majority vote over round 1."""
    out = []
    for pid, rows in sorted(_by_problem(records).items()):
        first = [rows[k] for k in sorted(rows) if k[0] == "generator" and k[2] == 1]
        vote = majority_vote([r["answer"] for r in first], equivalent, vote_rng(vote_seed, pid))
        if vote.answer is None:
            continue
        for r in first:
            if r["answer"] is not None and equivalent(vote.answer, r["answer"]):
                out.append({"problem_id": pid, "messages": _conversation(r)})
    return out


def _round1(records: pa.Table) -> list[dict]:
    """Round-1 generator rows, sorted by (problem id, agent)."""
    rows = [r for r in records.to_pylist() if r["role"] == "generator" and r["round"] == 1]
    return sorted(rows, key=lambda r: (r["problem_id"], r["agent"]))


def _label(labels: Mapping[str, str], pid: str) -> str:
    if pid not in labels:
        raise ValueError(f"no ground-truth label for problem {pid}")
    return labels[pid]


def star_requests(records: pa.Table, labels: Mapping[str, str],
                  is_correct: Callable[[str | None, str], bool]) -> list[tuple[str, int]]:
    """STaR: (problem id, agent) of every round-1 reply whose answer is wrong or unparseable; each is
    re-asked with its label as a hint (the rationalization pass)."""
    return [(r["problem_id"], r["agent"]) for r in _round1(records)
            if not is_correct(r["answer"], _label(labels, r["problem_id"]))]


def star_examples(records: pa.Table, labels: Mapping[str, str], rationalizations: Sequence[dict[str, Any]],
                  is_correct: Callable[[str | None, str], bool],
                  extract_answer: Callable[[str], str | None]) -> tuple[list[Example], dict[str, int]]:
    """STaR's finetuning set from round-1 records, the labels and the rationalization pass's output.

    ``rationalizations`` holds one ``{"problem_id", "agent", "response"}`` per ``star_requests`` entry.
    Returns the examples (sorted by problem and agent) and counts: ``correct`` (kept as answered),
    ``rationalized`` (kept rationalizations), ``failed`` (rationalizations that missed the label).
    """
    by_key = {(r["problem_id"], int(r["agent"])): r["response"] for r in rationalizations}
    examples: list[Example] = []
    counts = {"samples": 0, "correct": 0, "rationalized": 0, "failed": 0}
    for row in _round1(records):
        pid, n = row["problem_id"], row["agent"]
        label = _label(labels, pid)
        counts["samples"] += 1
        if is_correct(row["answer"], label):
            counts["correct"] += 1
            examples.append({"problem_id": pid, "messages": _conversation(row)})
            continue
        if (pid, n) not in by_key:
            raise ValueError(f"problem {pid}, agent {n}: wrong round-1 answer but no rationalization")
        response = by_key[(pid, n)]
        if not is_correct(extract_answer(response), label):
            counts["failed"] += 1
            continue
        counts["rationalized"] += 1
        # The un-hinted round-1 prompt: at test time there is no hint to lean on.
        examples.append({"problem_id": pid, "messages": _conversation({**row, "response": response})})
    return examples, counts


def build_sets(method: Method, records: pa.Table, equivalent: Callable[[str, str], bool], *, agents: int,
               rounds: int, w: float, mix_seed: int, vote_seed: int,
               single_agent_budget: str = "member") -> tuple[dict[str, list[Example]], dict[str, Any]]:
    """Every label-free rule: ({file stem: examples}, counts) from one finetune-split debate.

    Takes no labels by construction; STaR (the one rule that needs them) goes through
    ``build_star_sets``. ``counts["trained"]`` gives the size of each train unit's set. The pooled rule's
    set is cut to one generator's size unless ``single_agent_budget`` is "pooled" (``member_budget``).
    """
    if method.uses_labels or method.rule == "star":
        raise ValueError(f"method {method.name!r} reads ground-truth labels: use build_star_sets")
    if method.evaluation_only:
        raise ValueError(f"method {method.name!r} trains nothing")
    files: dict[str, list[Example]] = {}
    counts: dict[str, Any] = {}
    if method.rule in ("multiagent", "pooled"):
        sets = build_agent_sets(records, equivalent, agents, rounds, w, seed=mix_seed)
        for n, agent_sets in enumerate(sets):
            counts[f"agent_{n}"] = agent_sets.counts()
        if method.rule == "multiagent":
            for n, agent_sets in enumerate(sets):
                files[f"{GENERATOR}_{n}"] = agent_sets.generator
                files[f"{CRITIC}_{n}"] = agent_sets.critic
            # For comparison only (not trained): what the single-model baselines would learn from here.
            files[SHARED_UNIT] = pooled(sets)
            files["majority_ft"] = majority_ft(records, equivalent, vote_seed)
        else:
            everything = pooled(sets)
            files[SHARED_UNIT] = (everything if single_agent_budget == "pooled"
                                  else member_budget(everything, sets, mix_seed))
            counts["pooled"] = {"examples": len(everything), "kept": len(files[SHARED_UNIT]),
                                "budget": single_agent_budget}
    elif method.rule == "majority":
        files[SHARED_UNIT] = majority_ft(records, equivalent, vote_seed)
    else:
        raise ValueError(f"unknown dataset rule {method.rule!r}")
    counts["trained"] = {u.name: len(files[u.name]) for u in train_units(method, agents)}
    return files, counts


def build_star_sets(records: pa.Table, labels: Mapping[str, str], rationalizations: Sequence[dict[str, Any]],
                    is_correct: Callable[[str | None, str], bool],
                    extract_answer: Callable[[str], str | None]) -> tuple[dict[str, list[Example]], dict[str, Any]]:
    """STaR's set (``star_examples``) as ({file stem: examples}, counts)."""
    examples, star_counts = star_examples(records, labels, rationalizations, is_correct, extract_answer)
    return {SHARED_UNIT: examples}, {"star": star_counts, "trained": {SHARED_UNIT: len(examples)}}
