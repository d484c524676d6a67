"""Render chat examples with the model's own chat template and mask everything but the targets.

The labels of an example are -100 everywhere except the tokens of its assistant turns whose
``weight`` is not 0 (the turn's text and its end-of-turn token). Turn boundaries are found by
rendering each prefix of the conversation: the template must render a conversation prefix as a prefix
of the full rendering (true of common templates); if it does not, encoding fails loudly rather than
training on misaligned labels.
"""

from __future__ import annotations

from typing import Any, Sequence

from mft_ray.errors import TemplateError

IGNORE = -100


def _ids(tokenizer: Any, messages: Sequence[dict], add_generation_prompt: bool) -> list[int]:
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_example(tokenizer: Any, messages: Sequence[dict], max_length: int) -> dict[str, list[int]] | None:
    """``{"input_ids", "labels"}`` for one conversation, truncated to ``max_length`` tokens.

    Returns None when truncation leaves no target token (the example cannot teach anything).
    """
    full = _ids(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE] * len(full)
    targets = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        prompt = _ids(tokenizer, messages[:i], add_generation_prompt=True)
        start = len(prompt)
        upto = _ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
        # Both renderings must be prefixes of the whole: for the last turn ``upto`` is the whole, so
        # only the prompt check can catch a template that renders a prefix differently.
        if full[: len(upto)] != upto or start > len(upto) or full[:start] != prompt:
            raise TemplateError(
                f"the chat template of {getattr(tokenizer, 'name_or_path', 'this tokenizer')} does not render "
                f"turn {i} as a prefix of the whole conversation; cannot place the loss mask"
            )
        labels[start:len(upto)] = full[start:len(upto)]
        targets += len(upto) - start
    if targets == 0:
        return None
    ids, labels = full[:max_length], labels[:max_length]
    if all(label == IGNORE for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def collate(batch: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch for training (labels padded with -100)."""
    import torch

    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def keep_target_logits(inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` (a collated batch) asking the model for logits only where a target is predicted.

    A causal LM's loss reads the logits at the positions just before target tokens; the prompt's positions
    are computed and thrown away. On a critic's example (a prompt of a few hundred tokens, a reply of ~100)
    the output layer over a 49k vocabulary and its log-softmax are a large part of a step's time and
    memory. The window starts one position before the batch's first target token, and labels are cut to
    the same window, so the loss (a mean over the same target tokens) and its gradients are unchanged.
    Needs a model whose forward takes ``logits_to_keep`` (transformers' causal LMs do).
    """
    labels = inputs["labels"]
    targets = (labels != IGNORE).any(dim=0).nonzero()
    if len(targets) == 0:
        return inputs
    start = max(int(targets[0]) - 1, 0)
    return {**inputs, "labels": labels[:, start:], "logits_to_keep": labels.shape[1] - start}
