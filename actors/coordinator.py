"""The debate coordinator: drives M-round debates of a society over a whole split, shard by shard.

For each shard it submits the full round graph at once (round 1 on all generators, then for each
m > 1 the summaries and the critics), chaining ObjectRefs from actor to actor; it only fetches the
final texts to vote and write the shard. Up to ``debate.shards_in_flight`` shards are in the graph at
once, so while one shard waits on its summaries the agents already work on the next.

An agent actor that dies mid-debate is restarted by Ray and its unfinished calls are resubmitted
(``actors.agent``: per-call seeds make a retried call reproduce the lost one), so the coordinator just
waits on its ObjectRefs; a shard is written once, after every round of it is back, so no record is
lost or written twice. Rather than re-creating actors itself, it leaves restarts to Ray: a restarted
actor keeps its handle, its placement-group bundle and the ObjectRefs already chained to it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

import ray
from ray.experimental import tqdm_ray

from mft_ray.config import Config, config_from_dict
from mft_ray.engines import SamplingParams
from mft_ray.run.records import debate_settings, shard_is_complete, split_shards, write_shard
from mft_ray.society.debate import Turn, TurnBatch, others_order
from mft_ray.society.members import CRITIC, GENERATOR, SUMMARIZER
from mft_ray.society.voting import majority_vote, vote_rng
from mft_ray.tasks import make_task
from mft_ray.tasks.answers import NONE

logger = logging.getLogger(__name__)


def _as_list(refs: Any, n: int) -> list:
    return [refs] if n == 1 else list(refs)


def _group(routes: dict[str, Any], role: str, n_agents: int) -> list[tuple[Any, list[int]]]:
    """[(actor, [agent indices it serves for ``role``])], in first-seen order."""
    groups: dict[Any, list[int]] = {}
    for n in range(n_agents):
        groups.setdefault(routes[f"{role}_{n}"], []).append(n)
    return list(groups.items())


def shown_order(config: Config, problem_id: str, round_: int, agent: int) -> list[int]:
    """The other agents in the order ``agent`` is shown their round ``round_ - 1`` responses."""
    if config.debate.shuffle_others:
        return others_order(config.seed, problem_id, round_, agent, config.debate.agents)
    return [k for k in range(config.debate.agents) if k != agent]


def submit_rounds(config: Config, routes: dict[str, Any], iteration: int, split: str, shard: Any,
                  problems: list[tuple[str, str]]) -> dict[Turn, list]:
    """Submit every round of a debate over ``problems`` ([(id, question)]) at once; ObjectRefs keyed by ``Turn``.

    Keys come in the order the rounds run (1/generator, 2/summarizer, 2/critic, ...), each holding
    one ObjectRef per agent (a ``TurnBatch``). Each call is seeded by (seed, iteration, split, shard,
    round, role, agents); the order each agent sees the others in by (seed, problem, round, agent).
    Shared by the batch coordinator and the interactive service.
    """
    n_agents, summarize = config.debate.agents, config.debate.summarize
    base = SamplingParams.from_config(config.sampling)
    questions = [q for _, q in problems]

    def sampling(round_: int, role: str, agents: list[int]) -> SamplingParams:
        return base.derive(iteration, split, shard, round_, role, *agents)

    def orders(round_: int, agents: list[int]) -> list[list[list[int]]]:
        return [[shown_order(config, pid, round_, n) for pid, _ in problems] for n in agents]

    refs: dict[Turn, list] = {}
    prev: list = [None] * n_agents
    for actor, idxs in _group(routes, GENERATOR, n_agents):
        out = actor.round1.options(num_returns=len(idxs)).remote(
            questions, idxs, sampling(1, GENERATOR, idxs))
        for n, ref in zip(idxs, _as_list(out, len(idxs))):
            prev[n] = ref
    refs[Turn(1, GENERATOR)] = list(prev)
    for m in range(2, config.debate.rounds + 1):
        summaries: list = []
        if summarize:
            everyone = list(range(n_agents))
            out = routes[SUMMARIZER].summarize.options(num_returns=n_agents).remote(
                questions, everyone, sampling(m, SUMMARIZER, everyone), orders(m, everyone), *prev)
            summaries = _as_list(out, n_agents)
            refs[Turn(m, SUMMARIZER)] = summaries
        new: list = [None] * n_agents
        for actor, idxs in _group(routes, CRITIC, n_agents):
            extra = [summaries[n] for n in idxs] if summarize else []
            out = actor.critique.options(num_returns=len(idxs)).remote(
                questions, idxs, sampling(m, CRITIC, idxs), summarize, orders(m, idxs), *prev, *extra)
            for n, ref in zip(idxs, _as_list(out, len(idxs))):
                new[n] = ref
        refs[Turn(m, CRITIC)] = list(new)
        prev = new
    return refs


@ray.remote(num_cpus=0)
class DebateCoordinator:
    """Runs debates for one society; ``routes`` maps member names to agent actors."""

    def __init__(self, config: dict[str, Any], routes: dict[str, Any]) -> None:
        logging.basicConfig(level=logging.INFO)
        self.config: Config = config_from_dict(config)
        self.routes = routes
        self.task = make_task(self.config.task)
        d = self.config.debate
        self.settings = debate_settings(d.agents, d.rounds, d.summarize, d.shuffle_others)

    def run(self, iteration: int, split: str, problems: list[tuple[str, str]], out_dir: str) -> dict[str, Any]:
        """Debate ``problems`` ([(id, question)]) and write shards under ``out_dir``; skip finished ones."""
        cfg = self.config.debate
        start = time.time()
        shards = split_shards(problems, cfg.shard_size)
        pending: deque = deque()
        skipped = 0
        self.bar = tqdm_ray.tqdm(total=len(shards), desc=f"debate {split} iter {iteration} (shards)")
        for k, shard in enumerate(shards):
            if shard_is_complete(out_dir, k, [pid for pid, _ in shard], self.settings):
                skipped += 1
                self.bar.update(1)
                continue
            pending.append((k, shard, self._submit(iteration, split, k, list(shard))))
            while len(pending) >= cfg.shards_in_flight:
                self._finish(iteration, split, out_dir, *pending.popleft(), total=len(shards))
        while pending:
            self._finish(iteration, split, out_dir, *pending.popleft(), total=len(shards))
        self.bar.close()
        stats = {"split": split, "iteration": iteration, "problems": len(problems), "shards": len(shards),
                 "skipped_shards": skipped, "seconds": round(time.time() - start, 3)}
        logger.info("debate %s iter %d done: %s", split, iteration, stats)
        return stats

    def _submit(self, iteration: int, split: str, shard: int, problems: list[tuple[str, str]]) -> dict[Turn, list]:
        """Submit every round of one shard; returns ObjectRefs keyed by round and role."""
        return submit_rounds(self.config, self.routes, iteration, split, shard, problems)

    def _finish(self, iteration: int, split: str, out_dir: str, shard: int,
                problems: list[tuple[str, str]], refs: dict[Turn, list], total: int) -> None:
        """Fetch one shard's texts, vote on the final round, write the shard atomically."""
        batches: dict[Turn, list[TurnBatch]] = {turn: ray.get(v) for turn, v in refs.items()}
        final = max(batches)
        rows = []
        for i, (pid, _) in enumerate(problems):
            finals = [self.task.extract_answer(b.responses[i]) for b in batches[final]]
            vote = majority_vote(finals, self.task.equivalent, vote_rng(self.config.seed, pid))
            for turn, per_agent in batches.items():
                for n, batch in enumerate(per_agent):
                    parsed = NONE if turn.role == SUMMARIZER else self.task.parse_answer(batch.responses[i])
                    shown = None if turn.round == 1 else shown_order(self.config, pid, turn.round, n)
                    rows.append({
                        "iteration": iteration, "split": split, "problem_id": pid, "agent": n, "role": turn.role,
                        "round": turn.round, "messages": batch.messages[i], "response": batch.responses[i],
                        "answer": parsed.answer, "answer_rule": parsed.rule, "majority": vote.answer,
                        "tie": vote.tie, "consensus": vote.consensus, "others_order": shown,
                    })
        write_shard(out_dir, shard, rows, [pid for pid, _ in problems], self.settings)
        self.bar.update(1)
        logger.info("debate %s iter %d: shard %d/%d written (%d problems)", split, iteration, shard + 1,
                    total, len(problems))
