"""The paper's method, baselines and ablations (Tables 1-5), each a named recipe that ``jobs.iterate`` runs.

``method=<name>`` in the config or on the command line picks one. Every method goes through the same
agent actors, debate coordinator, Ray Train finetunes and run-directory layout; a method only says

- how its society debates (agents, rounds, summarizer, prompt style, sampling temperature), for the
  evaluation debates and for the finetune-split debate that produces training data ("collect");
- which dataset rule turns the finetune-split debate records into finetuning sets;
- which *train units* are finetuned (a unit = one dataset file -> one checkpoint) and which society
  members use each checkpoint (every generator and critic share one model in the single-model methods);
- whether the rule may read ground-truth labels (STaR only; ``build_sets`` cannot be given any).

N = ``debate.agents``, M = ``debate.rounds`` as configured; ŷ = the final-round majority of a debate.

| name | evaluation (as the paper scores it) | finetune-split data | trained |
|---|---|---|---|
| ``base`` | 1 agent, 1 round (one sample) | – (iteration 0 only) | – |
| ``majority`` | N agents, 1 round (vote over N independent samples) | – (iteration 0 only) | – |
| ``majority_matched`` | N x M agents, 1 round (vote over as many samples as a debate's N x M answers) | – | – |
| ``debate`` | N x M debate, untrained | – (iteration 0 only) | – |
| ``multiagent_ft`` (default) | N x M debate | D^G_n, D^C_n (w-mix) per agent (``methods.datasets``) | 2N models |
| ``multiagent_ft_no_summary`` | N x M, other answers concatenated | as multiagent_ft | 2N models |
| ``multiagent_ft_no_critic`` | N x M debate | D^G_n only | N generators; critics stay the base model |
| ``cooperative_ft`` | N x M, critics asked to *combine* solutions (App. D) | as multiagent_ft | 2N models |
| ``unique_id_ft`` | N x M, agents addressed as GEN1.., CRIT1.. (App. E.2) | as multiagent_ft | 2N models |
| ``single_agent_ft`` | N x M debate | pooled: ∪_n D^G_n ∪ D^C_n | 1 model, every generator and critic |
| ``single_agent_ft_unique_id`` | N x M, GEN1.., CRIT1.. | pooled (the IDs are in the prompts) | 1 model, every member |
| ``single_agent_ft_high_temp`` | N x M debate at temperature 2 (Fig. 10) | pooled, debated at temperature 2 | 1 model, every member |
| ``single_agent_ft_no_debate`` | 1 agent, 1 round: the single-agent FT model answering directly | pooled | 1 model |
| ``majority_ft`` | N agents, 1 round: vote over N samples of the finetuned model | N samples (1 round), vote, keep ≡ vote | 1 model |
| ``star`` | N agents, 1 round: the final model's single sample and N-sample vote | N samples (1 round): keep ≡ truth; wrong ones re-asked with the true answer as a hint, keep rationalizations ≡ truth | 1 model |

Every run's metrics also hold, from its evaluation's round-1 records, the one-sample (``base_accuracy``) and
N-sample-vote (``majority_accuracy``) figures of that society.

Choices where the paper is not explicit (what a researcher would expect, stated here):

- Each method is scored as the paper scores it (its Table 1 and Section 3): the debate-based methods by the N x M debate
  (their model(s) in every generator and critic seat; the summarizer is always the base model), Majority
  FT and STaR by N samples of the finetuned model (``accuracy`` is their vote, ``base_accuracy`` one
  sample), and Single-agent FT w/o debate by one sample of the single-agent FT model.
- The single-model methods train one model with the ``finetune.generator`` hyperparameters; it
  starts from the previous iteration's shared model (``finetune.init_from=previous``) or the base.
- ``single_agent_ft_no_debate`` (Table 3) trains exactly what ``single_agent_ft`` trains, on the pooled
  debate data, and evaluates that model answering directly; ``majority_ft`` (Table 1) trains on the
  model's own majority-consistent samples with no debate. Their data debate runs 1 round (round-1
  records are independent samples seeded exactly as in an M-round debate, so they are the same samples
  at 1/M of the cost).
- STaR (Zelikman et al. 2022) uses the same N round-1 samples per problem as Majority FT, so the two
  differ only in the filter (truth vs vote) and in the rationalizations. A rationalization is asked
  once per wrong sample, through the same agent actors (``stages.rationalize``), with the hinted prompt
  of ``PromptSet.rationalize``; the kept example pairs the *un-hinted* round-1 prompt with the
  rationalization. Iterations start from the previous STaR model (original STaR restarts from the
  base each outer loop: ``finetune.init_from=base``).
- ``multiagent_ft_no_critic``: the critics are never finetuned and keep the base weights; they still
  take part in the debate, whose D^C sets are written for inspection but not trained on.
- Unique IDs: the paper does not pin down which society gets them. ``unique_id_ft`` gives them to the
  multiagent society (2N models, multiagent rule); ``single_agent_ft_unique_id`` to one model trained on
  the pooled set, the reading "can IDs alone let one model play distinct agents". Both are offered.
- ``single_agent_ft_high_temp`` sets ``sampling.temperature`` to 2 (Fig. 10; top_p unchanged) in every
  debate of the run, data and evaluation alike.
- ``base``, ``majority`` and ``majority_matched`` read their figures from a 1-round debate of 1, N and
  N x M agents; the first two figures of every other run are in its iteration-0 metrics
  (``base_accuracy``, ``majority_accuracy``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from mft_ray.config import Config
from mft_ray.errors import ConfigError
from mft_ray.society.members import CRITIC, GENERATOR, Member
from mft_ray.society.prompts import PromptSet
from mft_ray.tasks import make_task

RULES = ("none", "multiagent", "pooled", "majority", "star")
# How a method is scored: the N x M debate, a vote over N samples (1 round), or one sample of one agent.
EVALUATIONS = ("debate", "samples", "single")
SHARED_UNIT = "single_agent"  # dataset file stem and checkpoint folder of the single-model methods
HIGH_TEMPERATURE = 2.0  # the paper's Fig. 10


@dataclass(frozen=True)
class Method:
    """One method as data. ``None`` debate settings keep the configured value."""

    name: str
    title: str  # for tables: "Multiagent FT", "STaR", ...
    rule: str  # dataset rule, one of RULES ("none": evaluation only, iteration 0)
    evaluation: str = "debate"  # one of EVALUATIONS
    trained_roles: tuple[str, ...] = (GENERATOR, CRITIC)  # multiagent rules: roles that are finetuned
    shared_model: bool = False  # one model trained and used as every generator and critic
    uses_labels: bool = False  # may read ground-truth answers of the finetune split (STaR only)
    agents: int | None = None
    rounds: int | None = None
    summarize: bool | None = None
    collect_rounds: int | None = None  # rounds of the finetune-split (data) debate; None = as evaluation
    prompt_style: str = "debate"
    temperature: float | None = None  # replaces sampling.temperature in every debate of the run
    agents_times_rounds: bool = False  # as many agents as a debate has answers (N x M)

    @property
    def evaluation_only(self) -> bool:
        return self.rule == "none"


@dataclass(frozen=True)
class TrainUnit:
    """One finetune: ``<name>.jsonl`` -> checkpoint ``iter_<l>/<name>/``, used by ``members``."""

    name: str
    role: str  # whose hyperparameters: finetune.generator or finetune.critic
    index: int  # mixed into the finetune's seed (the agent index, as before methods existed)
    members: tuple[Member, ...]


def _methods(*methods: Method) -> dict[str, Method]:
    return {m.name: m for m in methods}


METHODS: dict[str, Method] = _methods(
    Method("base", "Base", "none", agents=1, rounds=1, summarize=False),
    Method("majority", "Majority", "none", rounds=1, summarize=False),
    Method("majority_matched", "Majority (N x M samples)", "none", rounds=1, summarize=False,
           agents_times_rounds=True),
    Method("debate", "Debate", "none"),
    Method("multiagent_ft", "Multiagent FT", "multiagent"),
    Method("multiagent_ft_no_summary", "Multiagent FT w/o summary", "multiagent", summarize=False),
    Method("multiagent_ft_no_critic", "Multiagent FT w/o critic", "multiagent", trained_roles=(GENERATOR,)),
    Method("cooperative_ft", "Cooperative FT", "multiagent", prompt_style="cooperative"),
    Method("unique_id_ft", "Multiagent FT with unique IDs", "multiagent", prompt_style="unique_id"),
    Method("single_agent_ft", "Single-agent FT", "pooled", shared_model=True),
    Method("single_agent_ft_unique_id", "Single-agent FT with unique IDs", "pooled", shared_model=True,
           prompt_style="unique_id"),
    Method("single_agent_ft_high_temp", "Single-agent FT (temperature 2)", "pooled", shared_model=True,
           temperature=HIGH_TEMPERATURE),
    Method("single_agent_ft_no_debate", "Single-agent FT w/o debate", "pooled", evaluation="single",
           shared_model=True),
    Method("majority_ft", "Majority FT", "majority", evaluation="samples", shared_model=True, collect_rounds=1),
    Method("star", "STaR", "star", evaluation="samples", shared_model=True, uses_labels=True, collect_rounds=1),
)


def get_method(name: str) -> Method:
    """The method called ``name``; ConfigError naming it and the valid names otherwise."""
    if name not in METHODS:
        raise ConfigError(f"method must be one of {list(METHODS)}, got {name!r}")
    return METHODS[name]


def method_config(config: Config, stage: str = "evaluate") -> Config:
    """The config a debate of ``stage`` ("evaluate" or "collect", the finetune-split data debate) runs
    with under ``config.method``: its agents, rounds, summarizer and temperature applied, and
    ``finetune.iterations = 0`` for evaluation-only methods.

    Apply it to the config as given, once (N x M agents are counted from the configured N and M).
    """
    if stage not in ("evaluate", "collect"):
        raise ValueError(f"stage must be 'evaluate' or 'collect', got {stage!r}")
    method = get_method(config.method)
    debate = config.debate
    agents = debate.agents * debate.rounds if method.agents_times_rounds else method.agents or debate.agents
    rounds = method.rounds or debate.rounds
    summarize = debate.summarize if method.summarize is None else method.summarize
    if stage == "collect" and method.collect_rounds is not None:
        # No later round reads a summary: without this the society would load a summarizer for nothing.
        rounds, summarize = method.collect_rounds, summarize and method.collect_rounds > 1
    if stage == "evaluate" and method.evaluation != "debate":
        agents = 1 if method.evaluation == "single" else agents
        rounds, summarize = 1, False
    finetune = config.finetune
    if method.evaluation_only:
        finetune = dataclasses.replace(finetune, iterations=0)
    return dataclasses.replace(
        config,
        debate=dataclasses.replace(debate, agents=agents, rounds=rounds, summarize=summarize),
        sampling=dataclasses.replace(config.sampling, temperature=(config.sampling.temperature
                                                                    if method.temperature is None
                                                                    else method.temperature)),
        finetune=finetune)


def describe(config: Config) -> dict[str, Any]:
    """What ``config.method`` runs, for metrics.json: name, title, rule and both debates' settings."""
    method = get_method(config.method)
    out: dict[str, Any] = {"name": method.name, "title": method.title, "rule": method.rule,
                           "shared_model": method.shared_model, "uses_labels": method.uses_labels,
                           "prompt_style": method.prompt_style, "evaluation": method.evaluation}
    for stage in ("evaluate", "collect"):
        c = method_config(config, stage)
        out[stage] = {"agents": c.debate.agents, "rounds": c.debate.rounds, "summarize": c.debate.summarize,
                      "temperature": c.sampling.temperature}
    out["units"] = [u.name for u in train_units(method, config.debate.agents)]
    out["samples_per_problem"] = samples_per_problem(method_config(config, "evaluate"))
    return out


def samples_per_problem(config: Config) -> int:
    """Answers sampled per problem by an evaluation with ``config`` (summaries not counted): N x M."""
    return config.debate.agents * config.debate.rounds


def prompt_set(config: Config) -> PromptSet:
    """The task's answer instruction in the prompt style of ``config.method``."""
    return PromptSet(make_task(config.task).answer_instruction, get_method(config.method).prompt_style)


def train_units(method: Method, agents: int) -> list[TrainUnit]:
    """The finetunes of one iteration of ``method`` with ``agents`` agents (none if evaluation-only)."""
    if method.evaluation_only:
        return []
    if method.shared_model:
        everyone = tuple(Member(role, n) for role in (GENERATOR, CRITIC) for n in range(agents))
        return [TrainUnit(SHARED_UNIT, GENERATOR, 0, everyone)]
    return [TrainUnit(str(Member(role, n)), role, n, (Member(role, n),))
            for role in (GENERATOR, CRITIC) if role in method.trained_roles for n in range(agents)]


def society_after(method: Method, agents: int, trained: Mapping[str, str],
                  previous: Mapping[Member, str]) -> dict[str, str]:
    """Member name -> weights of the new society: each unit's members take its checkpoint
    (``trained[unit.name]``), every other generator and critic keeps its ``previous`` weights."""
    society = {str(m): previous[m] for role in (GENERATOR, CRITIC) for m in (Member(role, n) for n in range(agents))}
    for unit in train_units(method, agents):
        for member in unit.members:
            society[str(member)] = trained[unit.name]
    return society

