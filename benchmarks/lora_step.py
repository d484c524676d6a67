"""One training step of the built-in real model, full finetune vs LoRA, in isolation: why a LoRA society's
finetunes are not 3x cheaper on a CPU.

    python benchmarks/lora_step.py [--threads 2] [--batch 8] [--length 512] [--targets 100] [--steps 3]

A critic-like micro-batch (``--batch`` rows of ``--length`` tokens, the loss on the last ``--targets``,
logits only over that window as the finetunes compute them) through SmolLM2-135M-Instruct, one optimizer
step each time, no Ray and no DeepSpeed. Configurations, each in its own process with ``--threads`` torch
threads: the full model in float32 and in bf16 autocast (the paper's precision on GPUs), LoRA (rank 8,
q/v projections, float32 adapters, learning-rate irrelevant here) over a float32 and a bfloat16 frozen base,
each with gradient checkpointing, and LoRA over a float32 base without it. The step time is the median of
``--steps`` steps after the first. The last line printed is one JSON object.

What it measures: a LoRA step saves the frozen weights' gradients and their optimizer update, but still runs
the base's forward and the backward through it (the adapters sit in every layer). With checkpointing the
forward runs twice: about 3 forwards' work against the full step's 4, so a ratio near 0.75, not 0.33.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import describe_machine  # noqa: E402 - after the path above

# (name, mode, dtype, gradient checkpointing)
CONFIGS = [
    ("full_fp32", "full", "float32", True),
    ("full_bf16_autocast", "full", "bfloat16", True),
    ("lora_fp32_base", "lora", "float32", True),
    ("lora_bf16_base", "lora", "bfloat16", True),
    ("lora_fp32_base_no_checkpointing", "lora", "float32", False),
]


def one_config(args: argparse.Namespace) -> None:
    """Time ``args.steps`` steps of one configuration in this process; print their times as JSON."""
    import torch
    from transformers import AutoModelForCausalLM

    from mft_ray.models.builtin import resolve_model_path

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    path = resolve_model_path("builtin:smollm2-135m-instruct")
    # The full finetune keeps float32 weights (bf16 only as autocast); LoRA's frozen base is held in ``dtype``.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype if args.mode == "lora" else torch.float32)
    if args.checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
        model.enable_input_require_grads()
    if args.mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                 task_type="CAUSAL_LM"))
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(100, 40000, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    window = args.targets + 1  # logits from one position before the first target, as keep_target_logits does
    labels = ids[:, -window:].clone()
    labels[:, 0] = -100
    autocast = args.mode == "full" and args.dtype == "bfloat16"
    model.train()
    times = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
                         logits_to_keep=window).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    print(json.dumps({"step_s": round(statistics.median(times[1:]), 2), "first_step_s": round(times[0], 2)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--targets", type=int, default=100)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mode", choices=["full", "lora"], help=argparse.SUPPRESS)  # one configuration
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.targets >= args.length or min(args.threads, args.batch, args.targets, args.steps) < 1:
        parser.error("--threads, --batch, --targets and --steps must be >= 1, and --targets < --length")
    if args.mode:
        one_config(args)
        return
    shared = ["--threads", str(args.threads), "--batch", str(args.batch), "--length", str(args.length),
              "--targets", str(args.targets), "--steps", str(args.steps)]
    steps = {}
    for name, mode, dtype, checkpointing in CONFIGS:
        done = subprocess.run([sys.executable, __file__, *shared, "--mode", mode, "--dtype", dtype,
                               "--checkpointing", str(int(checkpointing))],
                              capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"{name} failed:\n{done.stderr[-2000:]}")
        steps[name] = json.loads(done.stdout.strip().splitlines()[-1])["step_s"]
        print(f"{name}: {steps[name]} s per step", file=sys.stderr)
    print(json.dumps({
        "benchmark": "lora_step", "model": "SmolLM2-135M-Instruct", "batch": args.batch, "length": args.length,
        "targets": args.targets, "threads": args.threads, "lora": {"rank": 8, "targets": ["q_proj", "v_proj"]},
        "step_s": steps,
        "lora_over_full": {
            "fp32, checkpointing": round(steps["lora_fp32_base"] / steps["full_fp32"], 3),
            "bf16, checkpointing": round(steps["lora_bf16_base"] / steps["full_bf16_autocast"], 3),
            "best of each": round(min(v for k, v in steps.items() if k.startswith("lora"))
                                  / min(v for k, v in steps.items() if k.startswith("full")), 3)},
        "machine": describe_machine(),
    }))


if __name__ == "__main__":
    main()
