"""Reading answers out of real replies: every rule of mft_ray.tasks.answers (numeric tasks) and of the MMLU
task, on replies of the built-in SmolLM2-135M-Instruct saved in tests/fixtures/smollm2_replies.json."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from mft_ray.config import TaskConfig
from mft_ray.tasks import make_task
from mft_ray.tasks.answers import numeric_answer
from tests.conftest import REPO, SHARED_DATA

FIXTURE = json.loads((REPO / "tests" / "fixtures" / "smollm2_replies.json").read_text())["replies"]
TASKS = {
    "arithmetic": TaskConfig(name="arithmetic", form="a*b", max_int=12),
    "gsm8k": TaskConfig(name="gsm8k", path=str(SHARED_DATA / "gsm8k" / "test.jsonl")),
    "mmlu": TaskConfig(name="mmlu", path=str(SHARED_DATA / "mmlu" / "test.jsonl")),
}


def _task(name: str):
    return make_task(TASKS[name])


def _reply(task: str, contains: str) -> str:
    (reply,) = [r["reply"] for r in FIXTURE if r["task"] == task and contains in r["reply"]]
    return reply


@pytest.mark.parametrize("record", FIXTURE, ids=lambda r: f"{r['task']}-{r['reply'][-24:]!r}")
def test_every_saved_real_reply_reads_as_expected(record) -> None:
    parsed = _task(record["task"]).parse_answer(record["reply"])
    assert (parsed.answer, parsed.rule) == (record["answer"], record["rule"])


def test_the_fixture_exercises_every_rule() -> None:
    rules = Counter((r["task"] == "mmlu", r["rule"]) for r in FIXTURE)
    for rule in ("boxed", "answer_is", "equals", "last_number"):
        assert rules[False, rule] >= 1, rule
    for rule in ("answer_is", "option_letter", None):
        assert rules[True, rule] >= 1, rule


# One real reply per rule, read by hand.

def test_a_box_with_a_number_wins() -> None:
    assert numeric_answer(_reply("arithmetic", "So, the answer is \\boxed{12}")) == ("12", "boxed")


def test_a_box_without_a_number_is_read_past() -> None:
    # SmolLM2 copies the instruction's "\boxed{answer}" and writes its number elsewhere.
    reply = _reply("arithmetic", "7 * 5 = 30\n\nThe final answer is \\boxed{answer}")
    assert numeric_answer(reply) == ("30", "last_number")


def test_an_explicit_answer_statement_comes_before_the_last_number() -> None:
    assert numeric_answer(_reply("arithmetic", "8*2 = 16\n\nThe answer is 16")) == ("16", "answer_is")


def test_a_closing_equation_gives_the_answer() -> None:
    assert numeric_answer(_reply("arithmetic", "12*1 = 12\n12 * 1 = 12")) == ("12", "equals")


def test_else_the_last_number_as_du_et_al_read_it() -> None:
    reply = _reply("gsm8k", "So, John has 96 bananas.")
    assert numeric_answer(reply) == ("96", "last_number")


def test_mmlu_explicit_letter_and_a_single_named_option() -> None:
    mmlu = _task("mmlu")
    assert mmlu.parse_answer(_reply("mmlu", "The correct answer is D.")) == ("D", "answer_is")
    assert mmlu.parse_answer(_reply("mmlu", "D) neither genotype nor phenotype")) == ("D", "option_letter")
    # A reply listing all four options names none of them: unparseable, so it never votes.
    listing = _reply("mmlu", "B) external storage\nC) processing power")
    assert mmlu.parse_answer(listing) == (None, None) and mmlu.extract_answer(listing) is None


@pytest.mark.parametrize("text, answer, rule", [
    ("The answer is 1,234.", "1234", "answer_is"),
    ("Final answer: $-7", "-7", "answer_is"),
    ("answer is 3/4", "3/4", "answer_is"),
    ("so 3 + 4 = 7.", "7", "equals"),
    ("= -3", "-3", "equals"),
    ("it is 10-4", "4", "last_number"),   # a minus after a digit is subtraction, not a sign
    ("The answer is -12 apples", "-12", "answer_is"),
    ("no number here", None, None),
    ("\\boxed{}", None, None),
])
def test_numeric_rules_on_edge_cases(text, answer, rule) -> None:
    assert numeric_answer(text) == (answer, rule)


@pytest.mark.parametrize("text, answer, rule", [
    ("\\boxed{b}", "B", "boxed"),
    ("The answer is (c).", "C", "answer_is"),
    ("answer: (b).", "B", "answer_is"),
    ("The answer is: c", "C", "answer_is"),
    ("I pick (a) over (d)", "D", "paren_letter"),
    ("c. Paris", "C", "option_letter"),
    ("nothing at all", None, None),
])
def test_mmlu_rules_accept_lower_case(text, answer, rule) -> None:
    assert _task("mmlu").parse_answer(text) == (answer, rule)


def test_an_unparseable_reply_is_never_correct() -> None:
    for name in TASKS:
        task = _task(name)
        assert task.extract_answer("no answer, sorry") is None
        assert not task.is_correct(None, "4")
