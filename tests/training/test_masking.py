"""Loss masking of chat examples (mft_ray.training.tokenize) with the built-in character-level tokenizer.

Expected label positions are found independently of the code under test: the whole conversation is
rendered once as text, each trained assistant turn is located in that text by its (unique) content, and
the position is the token count of the text before it.
"""

from __future__ import annotations

import pytest

from mft_ray.errors import TemplateError
from mft_ray.models.tiny import build_tokenizer
from mft_ray.training.tokenize import IGNORE, collate, encode_example

END = "<|end|>"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def render(tok, messages) -> str:
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tok.apply_chat_template(plain, tokenize=False, add_generation_prompt=False)


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def expected_positions(tok, messages) -> set[int]:
    """Token positions of every assistant turn without weight 0 (its content and its <|end|>)."""
    text = render(tok, messages)
    positions: set[int] = set()
    for m in messages:
        if m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        marker = "<|assistant|>" + m["content"] + END
        assert text.count(marker) == 1, "test contents must be unique"
        begin = text.index(marker) + len("<|assistant|>")
        start = n_tokens(tok, text[:begin])
        positions |= set(range(start, start + n_tokens(tok, m["content"] + END)))
    return positions


def labelled(encoded) -> list[int]:
    return [i for i, label in enumerate(encoded["labels"]) if label != IGNORE]


def labelled_text(tok, encoded) -> str:
    return tok.decode([label for label in encoded["labels"] if label != IGNORE])


def critic_conversation(rounds: int = 2) -> list[dict]:
    messages = [{"role": "user", "content": "What is 3+4*2?"},
                {"role": "assistant", "content": "Round one: \\boxed{14}", "weight": 0}]
    for m in range(2, rounds + 1):
        messages.append({"role": "user", "content": f"Others say 11. Critique round {m}."})
        messages.append({"role": "assistant", "content": f"Round {m}: 3+8=11, \\boxed{{11}}"})
    return messages


# --------------------------------------------------------------------------------------------------


def test_generator_example_labels_only_the_reply(tok):
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is \\boxed{4}."}]
    enc = encode_example(tok, messages, max_length=4096)
    full = tok(render(tok, messages), add_special_tokens=False)["input_ids"]
    assert enc["input_ids"] == full
    assert len(enc["labels"]) == len(enc["input_ids"])
    assert set(labelled(enc)) == expected_positions(tok, messages)
    for i, label in enumerate(enc["labels"]):
        assert label == (enc["input_ids"][i] if i in expected_positions(tok, messages) else IGNORE)
    assert labelled_text(tok, enc) == "It is \\boxed{4}." + END
    assert enc["labels"][-1] == tok.eos_token_id  # the end-of-turn token is a target
    # the generation marker itself is not a target
    assert tok.convert_ids_to_tokens(enc["input_ids"][min(labelled(enc)) - 1]) == "<|assistant|>"


def test_system_and_user_turns_are_never_labelled(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"},
                {"role": "assistant", "content": "A."}]
    enc = encode_example(tok, messages, max_length=4096)
    assert set(labelled(enc)) == expected_positions(tok, messages)
    assert labelled_text(tok, enc) == "A." + END


def test_critic_example_labels_only_the_critic_turn(tok):
    messages = critic_conversation(rounds=2)
    enc = encode_example(tok, messages, max_length=4096)
    assert set(labelled(enc)) == expected_positions(tok, messages)
    assert labelled_text(tok, enc) == "Round 2: 3+8=11, \\boxed{11}" + END
    # no token of the round-1 reply (nor its end token) is labelled
    text = render(tok, messages)
    first = "<|assistant|>" + messages[1]["content"] + END
    begin = n_tokens(tok, text[: text.index(first)])
    first_span = range(begin, begin + n_tokens(tok, first))
    assert all(enc["labels"][i] == IGNORE for i in first_span)
    # labelled tokens are one contiguous run that ends the sequence
    lab = labelled(enc)
    assert lab == list(range(lab[0], len(enc["input_ids"])))


def test_three_round_conversation_labels_both_critic_turns(tok):
    messages = critic_conversation(rounds=3)
    enc = encode_example(tok, messages, max_length=4096)
    assert set(labelled(enc)) == expected_positions(tok, messages)
    assert labelled_text(tok, enc) == ("Round 2: 3+8=11, \\boxed{11}" + END + "Round 3: 3+8=11, \\boxed{11}" + END)
    assert "Round one" not in labelled_text(tok, enc)
    # the critic prompt between the two trained turns is not labelled
    text = render(tok, messages)
    prompt = "<|user|>" + messages[4]["content"] + END
    begin = n_tokens(tok, text[: text.index(prompt)])
    assert all(enc["labels"][i] == IGNORE for i in range(begin, begin + n_tokens(tok, prompt)))


def test_weight_other_than_zero_is_trained(tok):
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "yes", "weight": 1}]
    enc = encode_example(tok, messages, max_length=4096)
    assert labelled_text(tok, enc) == "yes" + END


def test_only_weight_zero_turns_returns_none(tok):
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "no", "weight": 0}]
    assert encode_example(tok, messages, max_length=4096) is None
    assert encode_example(tok, [{"role": "user", "content": "only a prompt"}], max_length=4096) is None


def test_messages_are_not_mutated(tok):
    messages = critic_conversation(rounds=2)
    before = [dict(m) for m in messages]
    encode_example(tok, messages, max_length=4096)
    assert messages == before


def test_truncation_keeps_lengths_equal(tok):
    messages = critic_conversation(rounds=2)
    full = encode_example(tok, messages, max_length=4096)
    start = min(labelled(full))
    cut = start + 5  # inside the critic turn
    enc = encode_example(tok, messages, max_length=cut)
    assert len(enc["input_ids"]) == len(enc["labels"]) == cut
    assert enc["input_ids"] == full["input_ids"][:cut]
    assert enc["labels"] == full["labels"][:cut]
    assert len(labelled(enc)) == 5
    # a max_length at least the full length changes nothing
    assert encode_example(tok, messages, max_length=len(full["input_ids"])) == full


def test_truncation_before_any_target_returns_none(tok):
    messages = critic_conversation(rounds=2)
    full = encode_example(tok, messages, max_length=4096)
    start = min(labelled(full))
    assert encode_example(tok, messages, max_length=start) is None
    assert encode_example(tok, messages, max_length=start + 1) is not None
    # cutting inside the weight-0 round-1 reply leaves no target either
    assert encode_example(tok, messages, max_length=start // 2) is None


class _CountFirstTemplate:
    """The built-in tokenizer with a template that opens with the message count, so a conversation
    prefix does not render as a prefix of the whole conversation."""

    def __init__(self, tok):
        self.tok = build_tokenizer()
        self.tok.chat_template = "{{ messages|length }}" + tok.chat_template
        self.name_or_path = "count-first"

    def apply_chat_template(self, *args, **kwargs):
        return self.tok.apply_chat_template(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self.tok(*args, **kwargs)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
    critic_conversation(rounds=2),
    critic_conversation(rounds=3),
], ids=["generator", "critic-2-rounds", "critic-3-rounds"])
def test_prefix_inconsistent_template_raises(tok, messages):
    with pytest.raises(TemplateError):
        encode_example(_CountFirstTemplate(tok), messages, max_length=4096)


def test_prefix_inconsistent_template_would_misalign_labels(tok):
    """With ten messages the count goes from one digit (prefix) to two (whole): the labels of the final
    turn would be shifted by one token if the template were trusted."""
    messages = []
    for i in range(4):
        messages += [{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"a{i}", "weight": 0}]
    messages += [{"role": "user", "content": "u4"}, {"role": "assistant", "content": "final"}]
    assert len(messages) == 10
    with pytest.raises(TemplateError):
        encode_example(_CountFirstTemplate(tok), messages, max_length=4096)


def test_collate_right_pads(tok):
    long = encode_example(tok, critic_conversation(rounds=2), max_length=4096)
    short = encode_example(tok, [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
                           max_length=4096)
    pad = 77  # not 0, to see that the given pad id is used
    batch = collate([short, long], pad_id=pad)
    width = len(long["input_ids"])
    n = len(short["input_ids"])
    assert n < width
    for name in ("input_ids", "labels", "attention_mask"):
        assert tuple(batch[name].shape) == (2, width)
    ids, labels, mask = (batch[k].tolist() for k in ("input_ids", "labels", "attention_mask"))
    assert ids[0] == short["input_ids"] + [pad] * (width - n)
    assert labels[0] == short["labels"] + [IGNORE] * (width - n)
    assert mask[0] == [1] * n + [0] * (width - n)
    assert ids[1] == long["input_ids"] and labels[1] == long["labels"] and mask[1] == [1] * width
    assert str(batch["input_ids"].dtype) == "torch.int64" and str(batch["labels"].dtype) == "torch.int64"


def test_keep_target_logits_leaves_loss_and_gradients_unchanged(tok, tmp_path):
    """The loss over the target window equals the loss over every position, and so do the gradients;
    the window starts one position before the batch's first target (not at 0, not later)."""
    import torch
    from transformers import AutoModelForCausalLM

    from mft_ray.models.tiny import TinyModelSpec, build_tiny_llama
    from mft_ray.training.tokenize import keep_target_logits

    long = encode_example(tok, critic_conversation(rounds=2), max_length=4096)
    short = encode_example(tok, [{"role": "user", "content": "A question of some length"},
                                 {"role": "assistant", "content": "A"}], max_length=4096)
    batch = collate([short, long], pad_id=0)
    first = min(labels.index(next(x for x in labels if x != IGNORE)) for labels in (short["labels"], long["labels"]))
    assert first > 1
    trimmed = keep_target_logits(batch)
    assert trimmed["logits_to_keep"] == batch["labels"].shape[1] - (first - 1)
    assert torch.equal(trimmed["labels"], batch["labels"][:, first - 1:])
    assert trimmed["labels"].shape[1] < batch["labels"].shape[1]

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(build_tiny_llama(tmp_path / "m", TinyModelSpec()))
    losses, grads = [], []
    for inputs in (batch, trimmed):
        model.zero_grad()
        out = model(**inputs)
        out.loss.backward()
        losses.append(float(out.loss.detach()))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        assert out.logits.shape[1] == inputs["labels"].shape[1]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_keep_target_logits_without_targets_keeps_the_batch(tok):
    import torch

    from mft_ray.training.tokenize import keep_target_logits

    batch = {"input_ids": torch.ones((1, 4), dtype=torch.long), "labels": torch.full((1, 4), IGNORE)}
    assert keep_target_logits(batch) is batch
