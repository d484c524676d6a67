"""The pure debate logic: who sees what in each round, and per-call seeds."""

from __future__ import annotations

import pytest

from mft_ray.engines.base import SamplingParams
from mft_ray.society.debate import (
    Turn,
    TurnBatch,
    concatenated_contexts,
    critic_messages,
    others_of,
    others_order,
    round1_messages,
    summary_messages,
)
from mft_ray.society.prompts import PromptSet

PROMPTS = PromptSet(answer_instruction="End with \\boxed{x}.")
QUESTIONS = ["What is 1+1?", "What is 2*3?"]
N = 3


def reply(agent: int, rnd: int, i: int) -> str:
    return f"<agent {agent} round {rnd} problem {i}>"


def generator_round1() -> list[TurnBatch]:
    msgs = round1_messages(QUESTIONS, PROMPTS)
    return [TurnBatch(messages=msgs, responses=[reply(n, 1, i) for i in range(len(QUESTIONS))]) for n in range(N)]


def test_round1_messages() -> None:
    msgs = round1_messages(QUESTIONS, PROMPTS)
    assert msgs == [[{"role": "user", "content": PROMPTS.question(q)}] for q in QUESTIONS]
    assert msgs[0][0]["content"].startswith("What is 1+1?\n")
    assert msgs[0][0]["content"].endswith("End with \\boxed{x}.")
    assert round1_messages([], PROMPTS) == []


def test_round1_conversations_are_independent_objects() -> None:
    msgs = round1_messages(QUESTIONS, PROMPTS)
    msgs[0].append({"role": "assistant", "content": "x"})
    assert len(msgs[1]) == 1


def test_others_of_excludes_only_the_agent() -> None:
    prev = generator_round1()
    assert others_of(prev, 1, 0) == [reply(0, 1, 0), reply(2, 1, 0)]
    assert others_of(prev, 0, 1) == [reply(1, 1, 1), reply(2, 1, 1)]
    assert others_of(prev, 2, 1) == [reply(0, 1, 1), reply(1, 1, 1)]


def test_others_order_is_a_seeded_shuffle_of_the_other_agents() -> None:
    orders = {(pid, m, n): others_order(0, pid, m, n, 5) for pid in ("p0", "p1", "p2") for m in (2, 3)
              for n in range(5)}
    for (pid, m, n), order in orders.items():
        assert sorted(order) == [k for k in range(5) if k != n]
        assert others_order(0, pid, m, n, 5) == order  # a rerun shows the same order
    assert len({tuple(o) for o in orders.values()}) > 10  # problems, rounds and agents get different orders
    assert any(others_order(1, f"p{i}", 2, 0, 5) != others_order(0, f"p{i}", 2, 0, 5) for i in range(10))  # the seed
    # Each of the two orders of 2 others comes up over many problems, about equally often.
    firsts = [others_order(0, f"p{i}", 2, 0, 3)[0] for i in range(400)]
    assert 150 < firsts.count(1) < 250


def test_summaries_and_concatenations_follow_the_given_order() -> None:
    prev = generator_round1()
    orders = [[2, 0], [0, 2]]  # agent 1's view of problem 0, then of problem 1
    summ = summary_messages(QUESTIONS, prev, 1, PROMPTS, orders)
    assert summ[0][0]["content"] == PROMPTS.summary(QUESTIONS[0], [reply(2, 1, 0), reply(0, 1, 0)])
    assert summ[1][0]["content"] == PROMPTS.summary(QUESTIONS[1], [reply(0, 1, 1), reply(2, 1, 1)])
    ctx = concatenated_contexts(QUESTIONS, prev, 1, PROMPTS, orders)
    assert ctx[0] == PROMPTS.concatenate([reply(2, 1, 0), reply(0, 1, 0)])
    with pytest.raises(ValueError, match="other than 1"):
        summary_messages(QUESTIONS, prev, 1, PROMPTS, [[1, 0], [0, 2]])  # its own response is never shown


@pytest.mark.parametrize("agent", range(N))
def test_summary_messages_exclude_own_and_include_others_in_order(agent: int) -> None:
    prev = generator_round1()
    convs = summary_messages(QUESTIONS, prev, agent, PROMPTS)
    assert len(convs) == len(QUESTIONS)
    for i, (q, conv) in enumerate(zip(QUESTIONS, convs)):
        assert len(conv) == 1 and conv[0]["role"] == "user"
        text = conv[0]["content"]
        assert q in text
        assert reply(agent, 1, i) not in text
        others = [n for n in range(N) if n != agent]
        positions = [text.index(reply(n, 1, i)) for n in others]
        assert positions == sorted(positions)
        # Only this problem's responses, never another problem's.
        for j in range(len(QUESTIONS)):
            if j != i:
                assert all(reply(n, 1, j) not in text for n in range(N))
        assert text == PROMPTS.summary(q, [reply(n, 1, i) for n in others])
        assert text.count("Agent ") == N - 1


def test_concatenated_contexts() -> None:
    prev = generator_round1()
    ctx = concatenated_contexts(QUESTIONS, prev, 1, PROMPTS)
    assert ctx == [
        f"\n\nOne agent solution: ```{reply(0, 1, i)}```\n\nOne agent solution: ```{reply(2, 1, i)}```"
        for i in range(len(QUESTIONS))
    ]


def test_critic_messages_extend_own_conversation() -> None:
    prev = generator_round1()
    contexts = ["summary A", "summary B"]
    for summarized, head in ((True, "Here is a summary of the responses from other agents: "),
                             (False, "These are the solutions to the problem from other agents: ")):
        convs = critic_messages(prev[2], contexts, PROMPTS, summarized)
        for i, conv in enumerate(convs):
            assert conv[:1] == prev[2].messages[i]
            assert conv[1] == {"role": "assistant", "content": reply(2, 1, i)}  # agent 2's own reply
            assert conv[2]["role"] == "user"
            assert conv[2]["content"] == PROMPTS.critique(contexts[i], summarized)
            assert conv[2]["content"].startswith(head + contexts[i])
            assert len(conv) == 3
    # The previous turn is not mutated.
    assert all(len(m) == 1 for m in prev[2].messages)


def test_conversation_so_far() -> None:
    batch = TurnBatch(messages=[[{"role": "user", "content": "q"}]], responses=["a"])
    assert batch.conversation_so_far(0) == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert batch.messages == [[{"role": "user", "content": "q"}]]


@pytest.mark.parametrize("summarize", [True, False])
def test_three_round_chain(summarize: bool) -> None:
    """At round m an agent's conversation holds 2m-1 messages: its own replies and critic prompts."""
    rounds = 3
    turns = generator_round1()
    for n in range(N):
        assert all(len(m) == 1 for m in turns[n].messages)
    history = [turns]
    for m in range(2, rounds + 1):
        new_turns = []
        for n in range(N):
            if summarize:
                summ = summary_messages(QUESTIONS, turns, n, PROMPTS)
                contexts = [f"summary for agent {n} of round {m - 1} problem {i}" for i in range(len(summ))]
            else:
                contexts = concatenated_contexts(QUESTIONS, turns, n, PROMPTS)
            msgs = critic_messages(turns[n], contexts, PROMPTS, summarize)
            new_turns.append(TurnBatch(msgs, [reply(n, m, i) for i in range(len(QUESTIONS))]))
        turns = new_turns
        history.append(turns)

    for m, batches in enumerate(history, start=1):
        for n, batch in enumerate(batches):
            for i, conv in enumerate(batch.messages):
                assert len(conv) == 2 * m - 1
                assert [x["role"] for x in conv] == ["user", "assistant"] * (m - 1) + ["user"]
                assert conv[0]["content"] == PROMPTS.question(QUESTIONS[i])
                # The assistant turns are this agent's own replies, rounds 1..m-1, in order.
                assert [x["content"] for x in conv[1::2]] == [reply(n, k, i) for k in range(1, m)]
                # A prefix of the next round's conversation.
                if m < rounds:
                    assert history[m][n].messages[i][: 2 * m - 1] == conv
    if not summarize:
        # Without summaries, round 3 shows the other agents' round-2 replies, never round 1's.
        last = history[2][0].messages[0][-1]["content"]
        assert reply(1, 2, 0) in last and reply(2, 2, 0) in last
        assert reply(1, 1, 0) not in last and reply(0, 2, 0) not in last


# ---------------------------------------------------------------------------------------------
# Per-call seeds


def test_derive_same_parts_same_seed() -> None:
    base = SamplingParams(temperature=0.7, top_p=0.8, max_new_tokens=12, seed=5)
    a = base.derive("eval", 3, 2, "generator", 1)
    b = base.derive("eval", 3, 2, "generator", 1)
    assert a == b
    assert (a.temperature, a.top_p, a.max_new_tokens) == (0.7, 0.8, 12)
    assert base.seed == 5  # frozen; derive returns a copy


def test_derive_different_parts_different_seeds() -> None:
    base = SamplingParams(seed=0)
    seeds = {base.derive(shard, rnd, agent).seed
             for shard in range(4) for rnd in (1, 2) for agent in range(3)}
    assert len(seeds) == 4 * 2 * 3
    assert base.derive(1).seed != base.seed
    assert base.derive(1, 2).seed != base.derive(2, 1).seed  # order matters


def test_derive_depends_on_the_base_seed() -> None:
    assert SamplingParams(seed=0).derive("x", 1).seed != SamplingParams(seed=1).derive("x", 1).seed


def test_derived_seed_fits_32_bits_and_is_stable() -> None:
    seed = SamplingParams(seed=0).derive(0, 1, 2).seed
    assert 0 <= seed < 2**32
    # Pinned value: a seed that changed between processes or versions would break resumed shards.
    assert seed == 215252838


# ---------------------------------------------------------------------------------------------
# Prompt styles (mft_ray.methods.registry picks one per method)


def test_default_style_texts_are_the_ones_the_testbeds_were_trained_on() -> None:
    # Spelled out: the built-in testbeds learned these exact words; a change here silently breaks them.
    p = PromptSet("End with \\boxed{x}.")
    assert p.question("Q?") == p.question("Q?", agent=2) == "Q?\nSolve the problem step by step. End with \\boxed{x}."
    assert p.summary("Q?", ["a", "b"]) == (
        "Here are responses from other agents to the problem: Q?\n\nAgent 1: a\n\nAgent 2: b\n\n"
        "Summarize these responses briefly, keeping each agent's key reasoning and final answer.")
    assert p.critique("S", True, agent=1) == p.critique("S", True) == (
        "Here is a summary of the responses from other agents: S\n\nUsing the reasoning from other agents as "
        "additional advice, can you give an updated answer? Examine your solution and that of the other agents "
        "step by step. End with \\boxed{x}.")
    assert p.critique("S", False).startswith("These are the solutions to the problem from other agents: S\n\n")
    assert p.concatenate(["a"]) == "\n\nOne agent solution: ```a```"


def test_unknown_style_is_refused() -> None:
    with pytest.raises(ValueError, match="prompt style must be one of"):
        PromptSet(style="friendly")


def test_cooperative_critic_combines_instead_of_critiquing() -> None:
    coop = PromptSet("End with \\boxed{x}.", style="cooperative")
    text = coop.critique("S", True, agent=0)
    assert text.startswith("Here is a summary of the responses from other agents: S\n\n")
    assert "derive a new solution by combining your solution with the solutions of other agents" in text
    assert "updated answer" not in text and "Examine" not in text
    assert text.endswith("End with \\boxed{x}.")
    # Generators and the summarizer are asked exactly as in the debate style.
    assert coop.question("Q?", 1) == PROMPTS_PLAIN.question("Q?")
    assert coop.summary("Q?", ["a"]) == PROMPTS_PLAIN.summary("Q?", ["a"])


PROMPTS_PLAIN = PromptSet(answer_instruction="End with \\boxed{x}.")
UNIQUE = PromptSet(answer_instruction="End with \\boxed{x}.", style="unique_id")


def test_unique_ids_address_each_agent_and_label_the_others() -> None:
    gen = [TurnBatch(round1_messages(QUESTIONS, UNIQUE, n), [reply(n, 1, i) for i in range(2)]) for n in range(N)]
    for n in range(N):
        card = f"Agent ID: GEN{n + 1} (This is a generation agent {n + 1} tasked with creating a solution.)"
        assert gen[n].messages[0][0]["content"] == f"{card}\n\n" + PROMPTS_PLAIN.question(QUESTIONS[0])
    # Round 2: the summary for agent 1 shows GEN1 and GEN3's round-1 replies under their IDs.
    summ = summary_messages(QUESTIONS, gen, 1, UNIQUE)[0][0]["content"]
    assert f"GEN1: {reply(0, 1, 0)}" in summ and f"GEN3: {reply(2, 1, 0)}" in summ
    assert "GEN2" not in summ and "Agent 1" not in summ
    crit = [TurnBatch(critic_messages(gen[n], ["s", "s"], UNIQUE, True, n), [reply(n, 2, i) for i in range(2)])
            for n in range(N)]
    card = "Agent ID: CRIT3 (This is a critic agent 3 tasked with evaluating and improving the solutions of the agents.)"
    assert crit[2].messages[0][-1]["content"].startswith(f"{card}\n\nHere is a summary")
    assert crit[2].messages[0][0]["content"].startswith("Agent ID: GEN3 (")  # its own round-1 turn
    # Round 3 without summaries: the others' round-2 replies come from critics, labelled CRIT<n>.
    ctx = concatenated_contexts(QUESTIONS, crit, 0, UNIQUE)[1]
    assert ctx == (f"\n\nSolution of agent CRIT2: ```{reply(1, 2, 1)}```"
                   f"\n\nSolution of agent CRIT3: ```{reply(2, 2, 1)}```")


def test_star_hint_prompt_holds_question_answer_and_instruction() -> None:
    text = PROMPTS_PLAIN.rationalize("What is 2+2?", "4")
    assert text.startswith("What is 2+2?\n") and "the correct final answer is 4." in text
    assert text.endswith("End with \\boxed{x}.")


def test_turns_sort_in_the_order_they_run() -> None:
    turns = [Turn(1, "generator")] + [Turn(m, r) for m in (2, 3) for r in ("summarizer", "critic")]
    assert sorted(reversed(turns)) == turns
    assert max(turns) == Turn(3, "critic")  # the final turn, the one voted on
    assert max(turns[:1]) == Turn(1, "generator")  # a one-round debate
    assert max([Turn(2, "critic"), Turn(2, "summarizer")]) == Turn(2, "critic")
    assert str(Turn(2, "summarizer")) == "2/summarizer"
    assert len({Turn(1, "generator"), Turn(1, "generator")}) == 1
    with pytest.raises(ValueError, match="role"):
        Turn(1, "judge")
