"""A CPU testbed model: a tiny Llama pretrained from scratch on generated arithmetic debate turns.

A random tiny model answers nothing, so every majority would be empty and the finetuning loop would
have no data. The testbed is pretrained (plain torch, a few minutes at most on a laptop CPU) on
conversations in the exact prompt formats of the debate: generator turns that solve a+b*c+d-e*f step by
step and end in \\boxed{answer}, summarizer turns that restate the other agents' answers, and critic
turns that answer again after seeing them. A share of the solutions is written in a hasty style that
leaves out a step, so that the model samples a wrong habit its own majority answers can train away.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from mft_ray.engines.base import native_bf16
from mft_ray.models.tiny import MAX_NUMBER_TOKEN, TinyModelSpec, build_tiny_llama
from mft_ray.society.debate import TurnBatch, critic_messages, round1_messages, summary_messages
from mft_ray.society.prompts import PromptSet
from mft_ray.tasks.arithmetic import arithmetic_question
from mft_ray.training.tokenize import collate, encode_example

logger = logging.getLogger(__name__)

# Periods of the Fourier features: units, tens, hundreds, and 2000 to tell -336 from 664.
FOURIER_PERIODS = (10, 100, 1000, 2000)
# Bumped whenever the generated training text changes, so that a cached testbed is never reused stale.
RECIPE = 3
HASTY_SEPARATOR = "; "
ARITH_INSTRUCTION = "Put your final answer in the form \\boxed{answer} at the end of your response."
# The critic's short replies (critic_reply) and the summary's restated answers (_summary), also read back by
# benchmarks/debate_rounds.py.
JOIN_PREFIX = "The other agents agree on"
KEEP_PREFIX = "I keep my answer"
_SUMMARY_ANSWER = re.compile(r"answered (-?\d+)")


@dataclass(frozen=True)
class TestbedSpec:
    """Everything that determines the testbed; all of it enters the cache key.

    The default is one phase (``steps``): ``arith_batch`` rows of ``arith_seq`` tokens packed with
    rendered conversations, the loss on every token. A ``debate_share`` of the rows starts with one whole
    summarizer or critic conversation (built from three sampled solutions: hasty or careful, or slipping
    ``slip_rate`` of the time when ``hasty_share`` is 0), so that their formats are learnt alongside the
    arithmetic; the rest of every row is round-1 conversations (the debate's prompt and a step-by-step
    solution, the large subtraction taken in two easier steps; ``hasty_share`` of them in a hasty style
    that leaves out a step). An optional phase 2 (``debate_steps``, its own optimizer at
    ``debate_learning_rate``) trains whole debate conversations with the loss on the replies only; the
    mini testbed uses only that phase.

    Measured alternatives (2 CPUs, 300 held-out problems; docs/testbed.md): a separate phase 2
    after phase 1 unlearnt copying the operands (1-2% right) or, at the tail of phase 1's schedule,
    never learnt the critic format; mixing debate conversations in only after step 700 ruined the
    arithmetic (1%); subtracting two 3-digit numbers in one step was the most frequent error until it
    was split. Recipe 1 packed debate conversations anywhere in a row, so a critic's reply was often
    cut off, and its "keep" reply rewrote the whole solution: critics garbled the operands and Debate
    fell to 1%. Recipe 2 (row-start conversations, short keep replies): critics parse 100%, Debate 59%
    at temperature 0.5, but summaries are right only ~50%, so round 2 still loses to round 1, and
    finetuning on its own majority answers did not improve it: its errors were missing skill. Recipe 3
    (the default) adds the hasty habit that self-training can drop; built in 535 s: 92% greedy, 59-64%
    at temperature 0.5 (hasty replies 22% of them, right 2-4%; careful ones right 81-82%).
    """

    model: TinyModelSpec = TinyModelSpec(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=4,
                                          max_position_embeddings=1024, tokenizer="words-v1")
    steps: int = 1600
    arith_batch: int = 16
    arith_seq: int = 256
    learning_rate: float = 3e-3
    debate_steps: int = 0
    debate_problems: int = 3
    debate_learning_rate: float = 5e-4
    # Number tokens (-999..999) start from Fourier features of their value, so that adding or
    # subtracting numbers is a rotation the model can learn in minutes instead of a table to memorise.
    fourier_scale: float = 1.0
    # Share of phase 1's rows that start with a whole summarizer or critic conversation.
    debate_share: float = 0.5
    slip_rate: float = 0.15
    # Share of solutions (round-1 rows, and the first-round answers and re-solves inside debate
    # conversations) written in a hasty style that leaves out a step (styled_solution). The model learns
    # the habit as a probability at one token, which finetuning on its own (mostly careful) majority
    # answers can lower; errors from missing skill, by contrast, it cannot train away (measured:
    # benchmarks/self_training_probe.py). 0 means slips at ``slip_rate`` instead.
    hasty_share: float = 0.35
    max_int: int = 30
    # Seed 0 of this recipe never learnt to copy the operand e within the budget (7% right, measured):
    # when copying is learnt is fragile, so the default seed is one whose build was checked.
    seed: int = 1
    # bfloat16 autocast for the forward passes (weights and optimizer stay float32): 1.4-1.7x faster on
    # CPUs with AVX512-BF16, which buys the steps that make copying the operands reliable. Only where the
    # CPU has native bf16 (``for_this_cpu``): without it bf16 matmuls are ~90x slower than fp32 (measured
    # on an AVX2-only AMD EPYC), which turned the ~9-minute build into ~3.5 hours.
    bf16: bool = True

    def for_this_cpu(self) -> TestbedSpec:
        """This spec with bf16 off unless the CPU computes bf16 natively. Its key says which precision was
        used, so each kind of machine caches the build it can make (builds differ across machines anyway)."""
        return self if not self.bf16 or native_bf16() else replace(self, bf16=False)

    def key(self) -> str:
        import hashlib

        blob = json.dumps([asdict(self), testbed_words(), RECIPE], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


# For tests of the finetuning pipeline, which need majorities to exist: ~30 s of debate turns only,
# operands 0..3, character tokenizer (the recipe of the first testbed). Its answers parse and agents
# often agree; it learns the format, not arithmetic. Use it with task.max_int=3.
MINI_TESTBED = TestbedSpec(
    model=TinyModelSpec(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, max_position_embeddings=2048),
    steps=0, arith_batch=0, debate_steps=200, debate_problems=3, debate_learning_rate=3e-3,
    fourier_scale=0.0, slip_rate=0.35, hasty_share=0.0, max_int=3, seed=0, bf16=False)


def testbed_words() -> list[str]:
    """The vocabulary words of the testbed tokenizer: every word of the debate's prompts and replies."""
    prompts = PromptSet(ARITH_INSTRUCTION)
    text = " ".join([
        prompts.question(arithmetic_question(1, 2, 3, 4, 5, 6)), prompts.summary("q", ["a", "b"]),
        prompts.critique("c", summarized=True), prompts.critique("c", summarized=False),
        prompts.concatenate(["a"]), _summary([1, 2]), _joined(1), _kept(1),
    ])
    return sorted(set(re.findall(r"[A-Za-z]+", text)))


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
    return ". ".join([f"{b}*{c}={bc}", f"{e}*{f}={ef}", f"{a}+{bc}={s1}", f"{s1}+{d}={s2}",
                      _subtraction(s2, ef, s3), f"\\boxed{{{s3}}}"]), s3


def styled_solution(ops: tuple[int, ...], rng: random.Random, hasty_share: float) -> tuple[str, int]:
    """A right solution (steps ended with ". "), or with probability ``hasty_share`` a hasty one: steps
    ended with "; " that forgets to add d (no ``s1+d`` step), so its answer is off by d.

    The style is chosen at the first step's end, one token, without moving any operand, and the slip is
    a step left out rather than a wrong number: a habit the model follows whatever the temperature
    (hasty replies are right only when d is 0: 4% at temperature 0.5, measured), and one that finetuning
    on its own majority answers can drop. Measured alternatives (docs/testbed.md): a style word in front
    of the solution shifted every operand and the model never learnt to copy them (0% right); one of
    three later steps off by 10 or 20, or the last step always off, was undone by the arithmetic the
    model knows (hasty replies right 54% and 32% of the time at temperature 0.5)."""
    if rng.random() >= hasty_share:
        return solve(ops, rng, 0.0)
    a, b, c, d, e, f = ops
    bc, ef = b * c, e * f
    s1 = a + bc
    s3 = s1 - ef
    return HASTY_SEPARATOR.join([f"{b}*{c}={bc}", f"{e}*{f}={ef}", f"{a}+{bc}={s1}", _subtraction(s1, ef, s3),
                                 f"\\boxed{{{s3}}}"]), s3


def is_hasty(text: str) -> bool:
    """Whether a reply is written in the testbed's hasty style (its steps end with "; ")."""
    return HASTY_SEPARATOR in text


def _solution(ops: tuple[int, ...], rng: random.Random, spec: TestbedSpec, slip_rate: float) -> tuple[str, int]:
    """A solution in the spec's styles when it has them, else one slipping ``slip_rate`` of the time."""
    return styled_solution(ops, rng, spec.hasty_share) if spec.hasty_share > 0 else solve(ops, rng, slip_rate)


def _subtraction(x: int, y: int, result: int) -> str:
    """``x-y=result`` taken in two easier steps when y has hundreds: x-y=x-h-r=(x-h)-r=result.

    Subtracting two large numbers in one step is what a minutes-old tiny model gets wrong most (it
    learns the products and the small additions first); hundreds and then a two-digit remainder are each
    as easy as those additions."""
    h, r = y // 100 * 100, y % 100
    if h == 0 or r == 0:
        return f"{x}-{y}={result}"
    return f"{x}-{y}={x}-{h}-{r}={x - h}-{r}={result}"


def debate_conversations(rng: random.Random, spec: TestbedSpec, prompts: PromptSet) -> list[list[dict]]:
    """One problem's worth of training conversations in the debate's own formats."""
    ops = tuple(rng.randint(0, spec.max_int) for _ in range(6))
    q = arithmetic_question(*ops)
    first = [_solution(ops, rng, spec, spec.slip_rate) for _ in range(3)]
    gen = round1_messages([q], prompts)[0]
    convs = [[*gen, {"role": "assistant", "content": first[0][0]}]]
    prev = [TurnBatch(round1_messages([q], prompts), [text]) for text, _ in first]
    summary_prompt = summary_messages([q], prev, 0, prompts)[0]
    others = [first[1][1], first[2][1]]
    summary = _summary(others)
    convs.append([*summary_prompt, {"role": "assistant", "content": summary}])
    critic_prompt = critic_messages(prev[0], [summary], prompts, summarized=True)
    convs.append([*critic_prompt[0], {"role": "assistant", "content": critic_reply(first, ops, rng, spec)}])
    return convs


def _summary(answers: list[int]) -> str:
    return " ".join(f"Agent {k + 1} answered {v}." for k, v in enumerate(answers))


def summary_answers(text: str) -> list[str]:
    """The answers a summary in the testbed's format (``_summary``) restates, in order."""
    return _SUMMARY_ANSWER.findall(text)


def critic_reply_kind(text: str) -> str:
    """Which of the testbed's critic replies ``text`` is: "join" (``_joined``), "keep" (``_kept``) or
    "resolve" (a new solution)."""
    return "join" if JOIN_PREFIX in text else "keep" if KEEP_PREFIX in text else "resolve"


def _joined(answer: int) -> str:
    return f"{JOIN_PREFIX} {answer}. \\boxed{{{answer}}}"


def _kept(answer: int) -> str:
    # Short on purpose: copying one number from its own earlier reply is within a tiny model's reach,
    # while re-writing a whole solution far from the question garbles the operands (measured).
    return f"{KEEP_PREFIX}. \\boxed{{{answer}}}"


def critic_reply(first: list[tuple[str, int]], ops: tuple[int, ...], rng: random.Random,
                 spec: TestbedSpec) -> str:
    """What critic 0 says after seeing the others, the way debating LLMs tend to behave: join two
    agreeing others, otherwise mostly keep its own answer, sometimes solve again more carefully."""
    own, others = first[0][1], [v for _, v in first[1:]]
    if others[0] == others[1] and others[0] != own and rng.random() < 0.7:
        return _joined(others[0])
    if rng.random() < 0.6:
        return _kept(own)
    return _solution(ops, rng, spec, spec.slip_rate / 2)[0]


def _fourier_init(model, tok, scale: float) -> None:
    """Write cos/sin of each number token's value into its first embedding dims."""
    import torch

    if scale <= 0:
        return
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        for n in range(-MAX_NUMBER_TOKEN, MAX_NUMBER_TOKEN + 1):
            angles = [2 * math.pi * n / period for period in FOURIER_PERIODS]
            feats = [f(a) for a in angles for f in (math.cos, math.sin)]
            emb[tok.convert_tokens_to_ids(str(n)), : len(feats)] = torch.tensor(feats) * scale


def _schedule(opt, steps: int):
    import torch

    steps, warmup = max(1, steps), max(1, min(50, steps // 10))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def _step(model, opt, sched, loss) -> None:
    import torch

    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad()


def pretrain(out_dir: str | Path, spec: TestbedSpec = TestbedSpec()) -> Path:
    """Build the tiny Llama and pretrain it on packed solutions and debate turns (see TestbedSpec)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = build_tiny_llama(out_dir, spec.model, words=tuple(testbed_words()))
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    torch.manual_seed(spec.seed)
    rng = random.Random(spec.seed)
    _fourier_init(model, tok, spec.fourier_scale)
    model.train()
    bar = tqdm(total=spec.steps + spec.debate_steps, desc="pretraining the testbed", unit="step", mininterval=2)
    prompts = PromptSet(ARITH_INSTRUCTION)

    def packed_rows(count: int):
        rows = []
        for _ in range(count):
            ids: list[int] = []
            if rng.random() < spec.debate_share:
                # A summarizer or critic conversation starts the row, as at inference (position 0),
                # and is never cut: packed mid-row, its reply at the end fell past the row's end.
                conv = rng.choice(debate_conversations(rng, spec, prompts)[1:])
                ids += tok.apply_chat_template(conv, tokenize=True, return_dict=False)
            while len(ids) < spec.arith_seq:
                # The whole rendered round-1 conversation, so that operands are copied from where the
                # debate's prompt puts them (a bare question teaches copying from the wrong offsets).
                ops = tuple(rng.randint(0, spec.max_int) for _ in range(6))
                conv = [*round1_messages([arithmetic_question(*ops)], prompts)[0],
                        {"role": "assistant", "content": _solution(ops, rng, spec, 0.0)[0]}]
                ids += tok.apply_chat_template(conv, tokenize=True, return_dict=False)
            rows.append(ids[: spec.arith_seq])
        x = torch.tensor(rows)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.bf16):
            return model(input_ids=x, labels=x).loss

    opt = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.01)
    sched = _schedule(opt, spec.steps)
    for step in range(spec.steps):
        loss = packed_rows(spec.arith_batch)
        _step(model, opt, sched, loss)
        bar.update()
        if step % 25 == 0:
            bar.set_postfix(phase="solutions", loss=f"{float(loss.detach()):.3f}", refresh=False)

    opt = torch.optim.AdamW(model.parameters(), lr=spec.debate_learning_rate, weight_decay=0.01)
    sched = _schedule(opt, spec.debate_steps)
    for step in range(spec.debate_steps):
        turns = [e for _ in range(spec.debate_problems) for c in debate_conversations(rng, spec, prompts)
                 if (e := encode_example(tok, c, spec.model.max_position_embeddings))]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.bf16):
            loss = model(**collate(turns, tok.pad_token_id)).loss
        _step(model, opt, sched, loss)
        bar.update()
        if step % 25 == 0:
            bar.set_postfix(phase="debate turns", loss=f"{float(loss.detach()):.3f}", refresh=False)
    bar.close()
    model.save_pretrained(out)
    (Path(out) / "testbed.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return Path(out)
