"""Per-agent finetuning sets (docs/method.md, "Multiagent finetuning"): D^G_n, D^C-_n, D^C+_n, the critic mix, pooled and Majority FT.

Debate records are written by hand here (no Ray, no model): every reply and prompt carries a tag naming
its problem, agent and round, so that each expected example can be spelled out exactly.
"""

from __future__ import annotations

import math
import random

import pytest

from mft_ray.config import TaskConfig
from mft_ray.methods.datasets import AgentSets, build_agent_sets, majority_ft, mix, pooled
from mft_ray.run.records import rows_to_table
from mft_ray.society.voting import majority_vote, vote_rng
from mft_ray.tasks import make_task

AGENTS = 3


@pytest.fixture(scope="module")
def equivalent():
    return make_task(TaskConfig(name="arithmetic")).equivalent


# --------------------------------------------------------------------------------------------------
# Hand-written records


def prompt0(pid: str, n: int) -> str:
    return f"[{pid}] question for agent {n}"


def critic_prompt(pid: str, n: int, m: int) -> str:
    return f"[{pid}] round {m} critique prompt for agent {n}"


def reply(pid: str, n: int, m: int, answer: str | None) -> str:
    return f"[{pid}] agent {n} round {m} says \\boxed{{{answer if answer is not None else '??'}}}"


def problem_rows(pid: str, answers: list[list[str | None]], majority: str | None, *, tie: bool = False,
                 summaries: bool = True) -> list[dict]:
    """Records of one problem. ``answers[n][m-1]`` is agent n's parsed answer in round m (None =
    unparseable); round 1 is a generator row, rounds 2.. are critic rows whose prompt is the agent's
    own conversation so far plus a critique prompt, as in mft_ray.society.debate."""
    rounds = len(answers[0])
    base = {"iteration": 0, "split": "finetune", "problem_id": pid, "majority": majority, "tie": tie,
            "consensus": 0.5}
    rows = []
    for n, agent_answers in enumerate(answers):
        assert len(agent_answers) == rounds
        conversation = [{"role": "user", "content": prompt0(pid, n)}]
        for m, answer in enumerate(agent_answers, start=1):
            if m > 1:
                conversation.append({"role": "user", "content": critic_prompt(pid, n, m)})
                if summaries:
                    rows.append({**base, "agent": n, "role": "summarizer", "round": m,
                                 "messages": [{"role": "user", "content": f"[{pid}] summarise for {n}"}],
                                 "response": f"[{pid}] summary for agent {n} round {m}", "answer": None})
            response = reply(pid, n, m, answer)
            rows.append({**base, "agent": n, "role": "generator" if m == 1 else "critic", "round": m,
                         "messages": [dict(x) for x in conversation], "response": response, "answer": answer})
            conversation.append({"role": "assistant", "content": response})
    return rows


def gen_example(pid: str, n: int, answer: str | None) -> dict:
    return {"problem_id": pid, "messages": [
        {"role": "user", "content": prompt0(pid, n)},
        {"role": "assistant", "content": reply(pid, n, 1, answer)},
    ]}


def critic_example(pid: str, n: int, answers: list[str | None]) -> dict:
    """Agent n's whole conversation; only the round-1 reply carries weight 0."""
    messages = [{"role": "user", "content": prompt0(pid, n)},
                {"role": "assistant", "content": reply(pid, n, 1, answers[0]), "weight": 0}]
    for m, answer in enumerate(answers[1:], start=2):
        messages.append({"role": "user", "content": critic_prompt(pid, n, m)})
        messages.append({"role": "assistant", "content": reply(pid, n, m, answer)})
    return {"problem_id": pid, "messages": messages}


# Two rounds, three agents. answers[n] = [round-1 answer, round-2 answer].
TWO_ROUNDS = {
    # majority "0.5": "0.50" and "1/2" are numerically equivalent to it.
    "p0": dict(answers=[["0.50", "0.5"],   # first right, final right   -> generator + kept
                        ["3", "0.5"],      # first wrong, final right   -> corrected
                        [None, "1/2"]],    # unparseable, final right   -> corrected
               majority="0.5"),
    "p1": dict(answers=[["7", "8"],        # final wrong                -> generator only
                        ["7", None],       # final unparseable          -> generator only
                        ["9", "7"]],       # corrected
               majority="7"),
    # nobody parsed a final answer: contributes nothing, even though round 1 agreed.
    "p2": dict(answers=[["4", None], ["4", None], ["5", None]], majority=None),
    # a tie between 2 and 3, broken in favour of 2: handled like any majority.
    "p3": dict(answers=[["2", "2"],        # generator + kept
                        ["2", "3"],        # generator only
                        ["3", None]],      # nothing
               majority="2", tie=True),
}


def records_for(problems: dict, summaries: bool = True, order=None):
    rows = []
    for pid, spec in problems.items():
        rows += problem_rows(pid, spec["answers"], spec["majority"], tie=spec.get("tie", False),
                             summaries=summaries)
    if order is not None:
        rows = order(rows)
    return rows_to_table(rows)


def expected_two_rounds() -> list[AgentSets]:
    a = {pid: spec["answers"] for pid, spec in TWO_ROUNDS.items()}
    return [
        AgentSets(generator=[gen_example("p0", 0, "0.50"), gen_example("p1", 0, "7"), gen_example("p3", 0, "2")],
                  corrected=[],
                  kept=[critic_example("p0", 0, a["p0"][0]), critic_example("p3", 0, a["p3"][0])]),
        AgentSets(generator=[gen_example("p1", 1, "7"), gen_example("p3", 1, "2")],
                  corrected=[critic_example("p0", 1, a["p0"][1])],
                  kept=[]),
        AgentSets(generator=[],
                  corrected=[critic_example("p0", 2, a["p0"][2]), critic_example("p1", 2, a["p1"][2])],
                  kept=[]),
    ]


def key(example: dict) -> str:
    return repr(example)


def same_multiset(xs, ys) -> bool:
    return sorted(map(key, xs)) == sorted(map(key, ys))


# --------------------------------------------------------------------------------------------------
# build_agent_sets


def test_two_rounds_exact_sets(equivalent):
    sets = build_agent_sets(records_for(TWO_ROUNDS), equivalent, agents=AGENTS, rounds=2, w=0.5, seed=0)
    assert len(sets) == AGENTS
    for n, (got, want) in enumerate(zip(sets, expected_two_rounds())):
        assert got.generator == want.generator, f"generator {n}"
        assert got.corrected == want.corrected, f"corrected {n}"
        assert got.kept == want.kept, f"kept {n}"


def test_two_rounds_counts_and_mix_with_one_side_empty(equivalent):
    sets = build_agent_sets(records_for(TWO_ROUNDS), equivalent, agents=AGENTS, rounds=2, w=0.5, seed=0)
    want = expected_two_rounds()
    # Each agent has one empty side, so its mix is the whole other side (w = 0.5 cannot be met).
    assert same_multiset(sets[0].critic, want[0].kept)
    assert same_multiset(sets[1].critic, want[1].corrected)
    assert same_multiset(sets[2].critic, want[2].corrected)
    assert [s.counts() for s in sets] == [
        {"generator": 3, "critic_corrected": 0, "critic_kept": 2, "critic": 2},
        {"generator": 2, "critic_corrected": 1, "critic_kept": 0, "critic": 1},
        {"generator": 0, "critic_corrected": 2, "critic_kept": 0, "critic": 2},
    ]


def test_example_shapes(equivalent):
    sets = build_agent_sets(records_for(TWO_ROUNDS), equivalent, agents=AGENTS, rounds=2, w=0.5, seed=0)
    for s in sets:
        for ex in s.generator:
            assert [m["role"] for m in ex["messages"]] == ["user", "assistant"]
            assert all("weight" not in m for m in ex["messages"])
        for ex in [*s.corrected, *s.kept]:
            msgs = ex["messages"]
            assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
            assert msgs[1]["weight"] == 0  # the round-1 reply is never a target
            assert "weight" not in msgs[3]  # the critic reply is
            assert f"[{ex['problem_id']}]" in msgs[0]["content"]
            assert f"[{ex['problem_id']}]" in msgs[3]["content"]


def test_problem_ids_and_majority_none_contributes_nothing(equivalent):
    sets = build_agent_sets(records_for(TWO_ROUNDS), equivalent, agents=AGENTS, rounds=2, w=0.5, seed=0)
    for s in sets:
        for ex in [*s.generator, *s.corrected, *s.kept, *s.critic]:
            assert ex["problem_id"] in {"p0", "p1", "p3"}
            # every message of an example belongs to the problem named by its problem_id
            assert all(m["content"].startswith(f"[{ex['problem_id']}]") for m in ex["messages"])


def test_agents_sets_are_independent(equivalent):
    sets = build_agent_sets(records_for(TWO_ROUNDS), equivalent, agents=AGENTS, rounds=2, w=0.5, seed=0)
    for n, s in enumerate(sets):
        for ex in [*s.generator, *s.corrected, *s.kept, *s.critic]:
            for m in ex["messages"]:
                if m["role"] == "assistant":
                    assert f"agent {n} " in m["content"], (n, m)
                for other in set(range(AGENTS)) - {n}:
                    assert f"agent {other} " not in m["content"], (n, m)


def test_agent_with_no_data_gets_nothing_even_if_others_do(equivalent):
    # Agent 2 is wrong in both rounds everywhere; the others are right: agent 2's sets stay empty.
    problems = {f"q{i}": dict(answers=[["5", "5"], ["5", "5"], ["6", "6"]], majority="5") for i in range(3)}
    sets = build_agent_sets(records_for(problems), equivalent, agents=AGENTS, rounds=2, w=0.5, seed=0)
    assert sets[2].counts() == {"generator": 0, "critic_corrected": 0, "critic_kept": 0, "critic": 0}
    assert sets[0].counts()["generator"] == sets[1].counts()["generator"] == 3


def test_summarizer_rows_and_row_order_are_ignored(equivalent):
    with_summaries = build_agent_sets(records_for(TWO_ROUNDS), equivalent, AGENTS, 2, 0.5, 0)
    without = build_agent_sets(records_for(TWO_ROUNDS, summaries=False), equivalent, AGENTS, 2, 0.5, 0)
    shuffled = build_agent_sets(
        records_for(TWO_ROUNDS, order=lambda rows: random.Random(7).sample(rows, len(rows))),
        equivalent, AGENTS, 2, 0.5, 0)
    for a, b, c in zip(with_summaries, without, shuffled):
        assert a == b == c
    for s in with_summaries:
        for ex in [*s.generator, *s.corrected, *s.kept]:
            assert all("summar" not in m["content"] for m in ex["messages"])


def test_tie_is_handled_like_any_majority(equivalent):
    # Same answers, flagged as a tie or not: identical sets.
    tie = {"t": dict(answers=[["2", "2"], ["3", "3"], ["2", None]], majority="2", tie=True)}
    plain = {"t": dict(answers=[["2", "2"], ["3", "3"], ["2", None]], majority="2", tie=False)}
    a = build_agent_sets(records_for(tie), equivalent, AGENTS, 2, 0.5, 0)
    b = build_agent_sets(records_for(plain), equivalent, AGENTS, 2, 0.5, 0)
    assert a == b
    assert a[0].generator == [gen_example("t", 0, "2")] and a[0].kept == [critic_example("t", 0, ["2", "2"])]
    assert a[1].counts() == {"generator": 0, "critic_corrected": 0, "critic_kept": 0, "critic": 0}
    assert a[2].generator == [gen_example("t", 2, "2")] and a[2].kept == [] and a[2].corrected == []


def test_only_first_and_final_rounds_decide_three_rounds(equivalent):
    problems = {
        "r": dict(answers=[["1", "9", "4"],    # wrong, wrong, right -> corrected
                           ["4", "9", "4"],    # right, wrong, right -> generator + kept
                           ["4", "4", "9"]],   # right, right, wrong -> generator only
                  majority="4"),
    }
    sets = build_agent_sets(records_for(problems), equivalent, agents=AGENTS, rounds=3, w=0.5, seed=0)
    ans = problems["r"]["answers"]
    assert sets[0].generator == [] and sets[0].kept == []
    assert sets[0].corrected == [critic_example("r", 0, ans[0])]
    assert sets[1].generator == [gen_example("r", 1, "4")] and sets[1].corrected == []
    assert sets[1].kept == [critic_example("r", 1, ans[1])]
    assert sets[2].generator == [gen_example("r", 2, "4")]
    assert sets[2].corrected == sets[2].kept == sets[2].critic == []

    msgs = sets[0].corrected[0]["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert [m.get("weight", 1) for m in msgs if m["role"] == "assistant"] == [0, 1, 1]
    assert msgs[3]["content"] == reply("r", 0, 2, "9")  # the round-2 critic reply is a trained turn
    assert msgs[5]["content"] == reply("r", 0, 3, "4")
    assert msgs[4]["content"] == critic_prompt("r", 0, 3)


def test_one_round_gives_generator_sets_only(equivalent):
    problems = {
        "s0": dict(answers=[["0.50"], ["0.5"], ["2"]], majority="0.5"),
        "s1": dict(answers=[[None], ["3"], ["3"]], majority="3"),
        "s2": dict(answers=[[None], [None], [None]], majority=None),
    }
    sets = build_agent_sets(records_for(problems), equivalent, agents=AGENTS, rounds=1, w=0.5, seed=0)
    assert sets[0].generator == [gen_example("s0", 0, "0.50")]
    assert sets[1].generator == [gen_example("s0", 1, "0.5"), gen_example("s1", 1, "3")]
    assert sets[2].generator == [gen_example("s1", 2, "3")]
    for s in sets:
        assert s.corrected == s.kept == s.critic == []


@pytest.mark.parametrize("drop", [("critic", 2, 2), ("generator", 1, 1)])
def test_missing_records_raise(equivalent, drop):
    rows = [r for r in records_for(TWO_ROUNDS).to_pylist()
            if not (r["problem_id"] == "p1" and (r["role"], r["agent"], r["round"]) == drop)]
    with pytest.raises(ValueError, match="p1"):
        build_agent_sets(rows_to_table(rows), equivalent, agents=AGENTS, rounds=2, w=0.5, seed=0)


def test_more_rounds_or_agents_than_recorded_raise(equivalent):
    with pytest.raises(ValueError):
        build_agent_sets(records_for(TWO_ROUNDS), equivalent, agents=AGENTS, rounds=3, w=0.5, seed=0)
    with pytest.raises(ValueError):
        build_agent_sets(records_for(TWO_ROUNDS), equivalent, agents=AGENTS + 1, rounds=2, w=0.5, seed=0)


def test_critic_mix_uses_w_per_agent_and_is_seeded(equivalent):
    # Agent 0: 2 corrected + 6 kept; with w = 0.5 the mix is both corrected and 2 of the 6 kept.
    problems = {}
    for i in range(8):
        first = "1" if i < 2 else "5"
        problems[f"m{i}"] = dict(answers=[[first, "5"], ["5", "5"], ["5", "5"]], majority="5")
    sets = build_agent_sets(records_for(problems), equivalent, agents=AGENTS, rounds=2, w=0.5, seed=3)
    s0 = sets[0]
    assert len(s0.corrected) == 2 and len(s0.kept) == 6
    assert len(s0.critic) == 4
    assert same_multiset([x for x in s0.critic if x in s0.corrected], s0.corrected)
    assert sum(x in s0.kept for x in s0.critic) == 2
    again = build_agent_sets(records_for(problems), equivalent, agents=AGENTS, rounds=2, w=0.5, seed=3)
    assert [s.critic for s in again] == [s.critic for s in sets]
    # w = 1: critic = all corrected; w = 0: all kept.
    only_c = build_agent_sets(records_for(problems), equivalent, AGENTS, 2, 1.0, 3)[0]
    only_k = build_agent_sets(records_for(problems), equivalent, AGENTS, 2, 0.0, 3)[0]
    assert same_multiset(only_c.critic, s0.corrected)
    assert same_multiset(only_k.critic, s0.kept)


# --------------------------------------------------------------------------------------------------
# mix


def examples(prefix: str, count: int) -> list[dict]:
    return [{"problem_id": f"{prefix}{i}", "messages": []} for i in range(count)]


def ids(xs) -> list[str]:
    return sorted(x["problem_id"] for x in xs)


def split_ids(xs) -> tuple[list[str], list[str]]:
    got = ids(xs)
    return [i for i in got if i[0] == "c"], [i for i in got if i[0] == "k"]


def test_mix_w1_all_corrected_w0_all_kept():
    c, k = examples("c", 4), examples("k", 7)
    assert ids(mix(c, k, 1.0, random.Random(0))) == ids(c)
    assert ids(mix(c, k, 0.0, random.Random(0))) == ids(k)


def test_mix_half_with_scarce_corrected():
    c, k = examples("c", 2), examples("k", 10)
    got_c, got_k = split_ids(mix(c, k, 0.5, random.Random(0)))
    assert got_c == ids(c)  # T = floor(min(2/0.5, 10/0.5)) = 4: both corrected ...
    assert len(got_k) == 2  # ... and 2 of the kept
    assert set(got_k) <= set(ids(k))


def test_mix_quarter_with_scarce_kept():
    c, k = examples("c", 5), examples("k", 6)
    got_c, got_k = split_ids(mix(c, k, 0.25, random.Random(0)))
    # T = floor(min(5/0.25, 6/0.75)) = floor(min(20, 8)) = 8 -> 2 corrected + 6 kept
    assert len(got_c) == 2 and set(got_c) <= set(ids(c))
    assert got_k == ids(k)


@pytest.mark.parametrize("w", [0.1, 0.25, 0.5, 0.8, 0.9])
def test_mix_one_side_empty_uses_the_other_whole(w):
    assert ids(mix([], examples("k", 3), w, random.Random(0))) == ids(examples("k", 3))
    assert ids(mix(examples("c", 3), [], w, random.Random(0))) == ids(examples("c", 3))


@pytest.mark.parametrize("w", [0.0, 0.3, 0.5, 1.0])
def test_mix_both_empty(w):
    assert mix([], [], w, random.Random(0)) == []


def test_mix_is_seeded():
    c, k = examples("c", 10), examples("k", 30)
    first = mix(c, k, 0.5, random.Random(11))
    assert mix(c, k, 0.5, random.Random(11)) == first  # same seed: same examples in the same order
    results = {tuple(x["problem_id"] for x in mix(c, k, 0.5, random.Random(seed))) for seed in range(10)}
    assert len(results) > 1  # a different seed can pick differently


def test_mix_does_not_mutate_inputs():
    c, k = examples("c", 5), examples("k", 9)
    c_before, k_before = list(c), list(k)
    mix(c, k, 0.4, random.Random(0))
    assert c == c_before and k == k_before


@pytest.mark.parametrize("w", [0.0, 0.1, 0.2, 0.25, 0.3, 0.5, 0.6, 0.75, 0.8, 0.9, 1.0])
def test_mix_rule_over_a_grid(w):
    for a in range(0, 8):
        for b in range(0, 8):
            c, k = examples("c", a), examples("k", b)
            out = mix(c, k, w, random.Random(f"{a}:{b}:{w}"))
            got_c, got_k = split_ids(out)
            # never duplicates and never invents an example
            assert len(out) == len({x["problem_id"] for x in out})
            assert set(got_c) <= set(ids(c)) and set(got_k) <= set(ids(k))
            if w >= 1 or b == 0:
                assert got_c == ids(c) and got_k == []
            elif w <= 0 or a == 0:
                assert got_c == [] and got_k == ids(k)
            else:
                total = math.floor(min(a / w, b / (1 - w)) + 1e-9)
                if a / w <= b / (1 - w):  # corrected is scarcer relative to its share: kept whole
                    assert got_c == ids(c), (a, b, w)
                    assert len(got_k) == min(b, total - round(w * total)), (a, b, w)
                else:  # kept is scarcer: kept whole
                    assert got_k == ids(k), (a, b, w)
                    assert len(got_c) == min(a, round(w * total)), (a, b, w)


def test_mix_keeps_the_scarcer_side_whole_even_when_rounding_would_drop_one():
    # a = 3, w = 0.8: T = floor(3 / 0.8) = 3 and round(0.8 * 3) = 2, but corrected examples are the
    # scarce side and must all be used (the documented rule: keep all of the scarcer side).
    c, k = examples("c", 3), examples("k", 20)
    got_c, got_k = split_ids(mix(c, k, 0.8, random.Random(0)))
    assert got_c == ids(c)
    assert len(got_k) == 1


# --------------------------------------------------------------------------------------------------
# pooled and majority_ft


def test_pooled_is_every_agents_generator_and_mixed_critic_data(equivalent):
    # Agent 0: 1 corrected + 2 kept with w = 0.5 -> mix of 1 + 1: one kept example is left out.
    problems = {
        "u0": dict(answers=[["1", "5"], ["5", "5"], ["5", "6"]], majority="5"),
        "u1": dict(answers=[["5", "5"], ["5", "5"], ["5", "6"]], majority="5"),
        "u2": dict(answers=[["5", "5"], ["2", "5"], ["5", "6"]], majority="5"),
    }
    sets = build_agent_sets(records_for(problems), equivalent, agents=AGENTS, rounds=2, w=0.5, seed=0)
    assert len(sets[0].kept) == 2 and len(sets[0].critic) == 2
    got = pooled(sets)
    assert got == [*sets[0].generator, *sets[0].critic, *sets[1].generator, *sets[1].critic,
                   *sets[2].generator, *sets[2].critic]
    assert len(got) == sum(len(s.generator) + len(s.critic) for s in sets)
    left_out = [x for x in sets[0].kept if x not in sets[0].critic]
    assert len(left_out) == 1 and left_out[0] not in got
    assert pooled([]) == []


def test_majority_ft_votes_over_round_one_only(equivalent):
    problems = {
        # round 1 says 5 (two votes), the debate ends on 6: majority FT keeps the two "5" replies,
        # while the multiagent generator set keeps agent 2's "6".
        "v0": dict(answers=[["5", "6"], ["5.0", "6"], ["6", "6"]], majority="6"),
        # nobody parsed anything in round 1: nothing, although the debate reached a majority.
        "v1": dict(answers=[[None, "3"], [None, "3"], [None, "3"]], majority="3"),
        # the debate reached no majority, but round 1 did: majority FT still uses it.
        "v2": dict(answers=[["8", None], ["1", None], ["8", None]], majority=None),
    }
    recs = records_for(problems)
    got = majority_ft(recs, equivalent, vote_seed=0)
    assert got == [gen_example("v0", 0, "5"), gen_example("v0", 1, "5.0"),
                   gen_example("v2", 0, "8"), gen_example("v2", 2, "8")]
    sets = build_agent_sets(recs, equivalent, agents=AGENTS, rounds=2, w=0.5, seed=0)
    assert [s.generator for s in sets] == [[], [], [gen_example("v0", 2, "6")]]


def test_majority_ft_tie_is_seeded(equivalent):
    problems = {f"w{i}": dict(answers=[["1", "1"], ["2", "1"], [None, "1"]], majority="1") for i in range(12)}
    recs = records_for(problems)
    first = majority_ft(recs, equivalent, vote_seed=5)
    assert majority_ft(recs, equivalent, vote_seed=5) == first
    assert len(first) == len(problems)  # one tied reply per problem, never both, never the None one
    for pid in problems:
        winner = majority_vote(["1", "2", None], equivalent, vote_rng(5, pid)).answer
        agent = {"1": 0, "2": 1}[winner]
        assert gen_example(pid, agent, winner) in first
    # Over 12 problems a fair tie-break picks both sides at least once.
    assert {ex["messages"][1]["content"].split(" says ")[1] for ex in first} == {"\\boxed{1}", "\\boxed{2}"}
