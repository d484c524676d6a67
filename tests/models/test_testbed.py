"""The testbed's tokenizer, its build (deterministic, cached, loadable), and the results report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from mft_ray.models import testbed
from mft_ray.models.testbed import ARITH_INSTRUCTION, MINI_TESTBED, debate_conversations
from mft_ray.models.tiny import TinyModelSpec, build_tokenizer

# A testbed small enough to build twice in a few seconds: it proves the recipe, not the skill.
MICRO = dataclasses.replace(
    MINI_TESTBED,
    model=TinyModelSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=2, max_position_embeddings=1024, tokenizer="words-v1"),
    steps=6, arith_batch=2, arith_seq=128, debate_steps=3, debate_problems=1, debate_learning_rate=5e-4,
    fourier_scale=1.0, slip_rate=0.15, hasty_share=0.35, max_int=30, bf16=True)


@pytest.fixture(scope="module")
def words_tok():
    return build_tokenizer("words-v1", tuple(testbed.testbed_words()))


@pytest.mark.parametrize("text", [
    "What is the result of 12+3*30+0-5*6?\nSolve the problem step by step.",
    "3*4=12. 905-899=6. \\boxed{-871}", "1000 and 123456 other Whatever\tthe\n\n", "",
    "agents agree? The other agents agree on 7. I keep my answer.", "Agentsanswered the-the",
])
def test_words_tokenizer_round_trips_any_text(words_tok, text):
    ids = words_tok(text, add_special_tokens=False)["input_ids"]
    assert words_tok.decode(ids) == text
    assert words_tok.unk_token_id not in ids


def test_words_tokenizer_makes_numbers_and_prompt_words_single_tokens(words_tok):
    for n in (0, 7, 30, 900, 999):
        assert len(words_tok(str(n), add_special_tokens=False)["input_ids"]) == 1
    prompt = f"What is the result of 1+2*3+4-5*6?\nSolve the problem step by step. {ARITH_INSTRUCTION}"
    # ~2.7x fewer tokens than characters: the point of the word tokenizer.
    assert len(words_tok(prompt, add_special_tokens=False)["input_ids"]) < len(prompt) / 2.5
    char_tok = build_tokenizer("char-v1")
    assert len(char_tok(prompt, add_special_tokens=False)["input_ids"]) == len(prompt)
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        build_tokenizer("bpe-v9")


def test_training_conversations_use_the_debate_formats_and_mask_prompts(words_tok):
    import random

    from mft_ray.society.prompts import PromptSet
    from mft_ray.training.tokenize import encode_example

    convs = debate_conversations(random.Random(0), testbed.TestbedSpec(), PromptSet(ARITH_INSTRUCTION))
    assert [c[0]["content"].split()[0] for c in convs] == ["What", "Here", "What"]  # generator, summary, critic
    for conv in convs:
        enc = encode_example(words_tok, conv, 1024)
        labelled = [t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != -100]
        assert words_tok.decode(labelled).endswith(conv[-1]["content"] + "<|end|>")
        assert "\\boxed{" in conv[-1]["content"] or conv[-1]["content"].startswith("Agent 1 answered")


def test_hasty_solutions_leave_out_adding_d_and_differ_from_careful_ones_from_the_first_separator(words_tok):
    import random
    import re

    from mft_ray.models.testbed import is_hasty, solve, styled_solution

    rng, ops = random.Random(0), (3, 12, 25, 7, 29, 30)
    truth = 3 + 12 * 25 + 7 - 29 * 30
    careful = solve(ops, random.Random(0), 0.0)[0]
    hasty = [styled_solution(ops, rng, 0.4) for _ in range(2000)]
    styles = [is_hasty(text) for text, _ in hasty]
    assert 0.36 < sum(styles) / len(styles) < 0.44
    for (text, value), style in zip(hasty, styles):
        assert value == int(re.findall(r"boxed\{(-?\d+)\}", text)[0])
        if not style:
            assert (text, value) == (careful, truth) and "; " not in text
            continue
        # The same first three steps (every operand copied from where a careful solution has it), then
        # the subtraction straight from a+b*c: the answer is off by d, the style chosen at one token.
        assert value == truth - 7
        assert text.startswith("12*25=300; 29*30=870; 3+300=303; 303-870=")
        assert "+7=" not in text and text.replace("; ", ". ").split(". 303-")[0] == careful.split(". 303+")[0]


def test_a_build_is_deterministic_cached_and_loadable(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from mft_ray.engines.base import SamplingParams
    from mft_ray.engines.hf import HFEngine
    from mft_ray.models import builtin as models
    from mft_ray.models.testbed import pretrain

    a, b = pretrain(tmp_path / "a", MICRO), pretrain(tmp_path / "b", MICRO)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    c = pretrain(tmp_path / "c", dataclasses.replace(MICRO, seed=1))
    assert not torch.equal(load_file(c / "model.safetensors")["model.embed_tokens.weight"],
                           wa["model.embed_tokens.weight"])
    assert json.loads((a / "testbed.json").read_text())["seed"] == 0

    # Cached by its settings: the second resolve reuses the directory, a changed setting rebuilds.
    monkeypatch.setenv("MFT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_testbed_spec", lambda name: MICRO)
    first = Path(models.resolve_model_path("builtin:testbed"))
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert Path(models.resolve_model_path("builtin:testbed")) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert first == models.builtin_model_dir("testbed")
    monkeypatch.setattr(models, "_testbed_spec", lambda name: dataclasses.replace(MICRO, slip_rate=0.3))
    assert Path(models.resolve_model_path("builtin:testbed")) != first
    assert not list((tmp_path / "cache" / "models").glob(".*"))  # no temporary build left behind

    engine = HFEngine(str(first))
    texts = engine.generate([[{"role": "user", "content": "What is the result of 1+2*3+4-5*6?"}]] * 2,
                            SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8, seed=3))
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_a_job_builds_its_builtin_model_in_the_driver_on_every_core(tmp_path, monkeypatch):
    """A fractional-CPU actor runs torch on one thread (Ray sets OMP_NUM_THREADS), so jobs build first."""
    import os

    import torch

    from mft_ray.models import builtin as models

    monkeypatch.setenv("MFT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(models, "_testbed_spec", lambda name: MICRO)
    threads, built_with = torch.get_num_threads(), []
    real = testbed.pretrain
    monkeypatch.setattr(testbed, "pretrain", lambda out, spec: (built_with.append(torch.get_num_threads()),
                                                                real(out, spec))[1])
    torch.set_num_threads(1)
    try:
        models.build_builtin_model("builtin:testbed")
        assert torch.get_num_threads() == 1  # the driver's own setting is restored
    finally:
        torch.set_num_threads(threads)
    assert built_with == [len(os.sched_getaffinity(0))]
    assert (models.builtin_model_dir("testbed") / "config.json").is_file()
    models.build_builtin_model(str(tmp_path / "a-local-checkpoint"))  # not built-in: nothing to build
    assert built_with == [len(os.sched_getaffinity(0))]


def _summary() -> dict:
    def it(i, acc, se, cons, datasets=None):
        return {"iteration": i, "accuracy": acc, "stderr": se, "consensus": cons, "problems": 400,
                "base_accuracy": 0.40, "base_stderr": 0.0245, "majority_accuracy": 0.48,
                "majority_stderr": 0.025, "datasets": datasets}

    counts = {"agent_0": {"generator": 10, "critic": 7}, "agent_1": {"generator": 12, "critic": 5},
              "problems": 50}
    return {"task": "arithmetic", "agents": 2, "rounds": 2,
            "iterations": [it(0, 0.50, 0.025, 0.7), it(1, 0.56, 0.0248, 0.8, counts), it(2, 0.61, 0.0244, 0.9, counts)]}


def test_report_table_rows_and_plot(tmp_path):
    from mft_ray.reports.run_report import result_rows, write_report
    from mft_ray.run.rundir import RunDir

    run = RunDir(tmp_path)
    TABLE, PLOT = run.report_path, run.plot_path

    rows = result_rows(_summary())
    assert [r["method"] for r in rows] == ["Base (one sample)", "Majority (2 samples)", "Debate (iteration 0)",
                                           "Multiagent FT (iteration 1)", "Multiagent FT (iteration 2)"]
    assert rows[4]["vs_debate_se"] == pytest.approx(0.11 / (0.0244 ** 2 + 0.025 ** 2) ** 0.5)
    assert rows[3]["examples"] == (22, 12)
    table = write_report(run, _summary())
    assert "| Multiagent FT (iteration 2) | 61.0 ± 2.4 | +3.1 | 0.900 | 22 / 12 |" in table
    assert "| Base (one sample) | 40.0 ± 2.5 | -2.9 | – | – |" in table
    assert TABLE.read_text().count("|") > 20
    assert PLOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stamp = PLOT.stat().st_mtime_ns
    write_report(run, _summary())  # unchanged results (a resumed run): nothing rewritten
    assert PLOT.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="no iteration 0"):
        result_rows({"iterations": []})


def test_bf16_only_where_the_cpu_has_it(monkeypatch):
    """Without native bf16 a testbed build would take hours (bf16 matmuls ~90x slower than fp32, measured on
    an AVX2-only CPU): such a CPU builds in fp32, under its own cache key."""
    spec = testbed.TestbedSpec()
    monkeypatch.setattr(testbed, "native_bf16", lambda: True)
    assert spec.for_this_cpu() is spec and spec.for_this_cpu().key() == spec.key()
    monkeypatch.setattr(testbed, "native_bf16", lambda: False)
    fp32 = spec.for_this_cpu()
    assert fp32.bf16 is False and fp32.key() != spec.key()
    assert testbed.MINI_TESTBED.for_this_cpu() is testbed.MINI_TESTBED  # fp32 already
