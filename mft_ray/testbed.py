"""A CPU testbed model: a tiny Llama pretrained from scratch on generated arithmetic debate turns.

A random tiny model answers nothing, so every majority would be empty and the finetuning loop would
have no data. The testbed is pretrained (plain torch, a few minutes at most on a laptop CPU) on
conversations in the exact prompt formats of the debate: generator turns that solve a+b*c+d-e*f step by
step and end in \\boxed{answer}, summarizer turns that restate the other agents' answers, and critic
turns that answer again after seeing them. A share of the solutions carry a deliberate slip, so that
the model's skill is partial and its errors varied.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from mft_ray.debate import TurnBatch, critic_messages, round1_messages, summary_messages
from mft_ray.models import TinyModelSpec, build_tiny_llama
from mft_ray.prompts import PromptSet

logger = logging.getLogger(__name__)

ARITH_INSTRUCTION = "Put your final answer in the form \\boxed{answer} at the end of your response."


@dataclass(frozen=True)
class TestbedSpec:
    """Everything that determines the testbed; all of it enters the cache key."""

    model: TinyModelSpec = TinyModelSpec(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=4,
                                          max_position_embeddings=2048)
    steps: int = 600
    batch_size: int = 16
    learning_rate: float = 3e-3
    slip_rate: float = 0.35  # share of solutions with one deliberate arithmetic slip
    max_int: int = 30
    seed: int = 0

    def key(self) -> str:
        import hashlib

        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


# A 2-layer model and a few hundred steps on operands 0..3: it learns the answer format (most replies
# parse) and answers in a small range, so agents often agree. Enough for tests of the finetuning
# pipeline, which need majorities to exist; use it with task.max_int=3.
MINI_TESTBED = TestbedSpec(
    model=TinyModelSpec(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, max_position_embeddings=2048),
    steps=200, batch_size=8, max_int=3)


def solve(ops: tuple[int, ...], rng: random.Random, slip_rate: float) -> tuple[str, int]:
    """A step-by-step solution of a+b*c+d-e*f; with probability ``slip_rate`` one step is off."""
    a, b, c, d, e, f = ops
    bc, ef = b * c, e * f
    slip = rng.random() < slip_rate
    where = rng.randrange(4) if slip else -1
    delta = rng.choice([-10, -2, -1, 1, 2, 10])
    if where == 0:
        bc += delta
    if where == 1:
        ef += delta
    s1 = a + bc + (delta if where == 2 else 0)
    s2 = s1 + d
    s3 = s2 - ef + (delta if where == 3 else 0)
    text = f"{b}*{c}={bc}. {e}*{f}={ef}. {a}+{bc}={s1}. {s1}+{d}={s2}. {s2}-{ef}={s3}. \\boxed{{{s3}}}"
    return text, s3


def _question(ops: tuple[int, ...]) -> str:
    a, b, c, d, e, f = ops
    return f"What is the result of {a}+{b}*{c}+{d}-{e}*{f}?"


def debate_conversations(rng: random.Random, spec: TestbedSpec, prompts: PromptSet) -> list[list[dict]]:
    """One problem's worth of training conversations in the debate's own formats."""
    ops = tuple(rng.randint(0, spec.max_int) for _ in range(6))
    q = _question(ops)
    first = [solve(ops, rng, spec.slip_rate) for _ in range(3)]
    gen = round1_messages([q], prompts)[0]
    convs = [[*gen, {"role": "assistant", "content": first[0][0]}]]
    prev = [TurnBatch(round1_messages([q], prompts), [text]) for text, _ in first]
    summary_prompt = summary_messages([q], prev, 0, prompts)[0]
    others = [first[1][1], first[2][1]]
    summary = " ".join(f"Agent {k + 1} answered {v}." for k, v in enumerate(others))
    convs.append([*summary_prompt, {"role": "assistant", "content": summary}])
    critic_prompt = critic_messages(prev[0], [summary], prompts, summarized=True)
    convs.append([*critic_prompt[0], {"role": "assistant", "content": critic_reply(first, ops, rng, spec)}])
    return convs


def critic_reply(first: list[tuple[str, int]], ops: tuple[int, ...], rng: random.Random,
                 spec: TestbedSpec) -> str:
    """What critic 0 says after seeing the others, the way debating LLMs tend to behave: join two
    agreeing others, otherwise mostly keep its own answer, sometimes solve again more carefully."""
    own, others = first[0][1], [v for _, v in first[1:]]
    if others[0] == others[1] and others[0] != own and rng.random() < 0.7:
        return f"The other agents agree on {others[0]}. \\boxed{{{others[0]}}}"
    if rng.random() < 0.6:
        return f"I keep my answer. \\boxed{{{own}}}"
    return solve(ops, rng, spec.slip_rate / 2)[0]


def pretrain(out_dir: str | Path, spec: TestbedSpec = TestbedSpec()) -> Path:
    """Build the tiny Llama and pretrain it on generated debate turns (loss on assistant turns)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mft_ray.training.tokenize import collate, encode_example

    out = build_tiny_llama(out_dir, spec.model)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    torch.manual_seed(spec.seed)
    rng = random.Random(spec.seed)
    prompts = PromptSet(ARITH_INSTRUCTION)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, spec.steps) / spec.steps)))
    model.train()
    pool: list[dict] = []
    for step in range(spec.steps):
        while len(pool) < spec.batch_size:
            pool.extend(e for e in (encode_example(tok, c, spec.model.max_position_embeddings)
                                    for c in debate_conversations(rng, spec, prompts)) if e)
        batch, pool = pool[:spec.batch_size], pool[spec.batch_size:]
        loss = model(**collate(batch, tok.pad_token_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 100 == 0 or step == spec.steps - 1:
            logger.info("testbed pretraining step %d/%d: loss %.3f", step + 1, spec.steps, float(loss.detach()))
    model.save_pretrained(out)
    (Path(out) / "testbed.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return Path(out)
