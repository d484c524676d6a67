"""The machine a benchmark ran on, in one line for its JSON.

Figures from two 2-core x86_64 machines of the same kind differed 1.5x (an Intel Xeon with AMX runs bf16
matrix products far faster than an AMD EPYC with AVX512-BF16 alone), so every figure names the CPU model and
the vector extensions that decide its speed, not just the architecture and core count.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

# The CPU flags that change how fast torch and vLLM run on a CPU, as /proc/cpuinfo spells them.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_model(cpuinfo: str) -> tuple[str, list[str]]:
    """The CPU's model name and which of ``SPEED_FLAGS`` it has, read from a /proc/cpuinfo text."""
    name, flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not name:
            name = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return name or "unknown CPU", [f for f in SPEED_FLAGS if f in flags]


def describe_machine(cpuinfo: str | None = None) -> str:
    """E.g. ``x86_64, 2 CPUs (AMD EPYC; avx2 avx512f avx512_bf16), torch 2.13.0+cpu, no GPU``. ``cpuinfo``:
    a /proc/cpuinfo text (default: this machine's, where there is one)."""
    import torch

    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    name, flags = cpu_model(cpuinfo) if cpuinfo else (platform.processor() or "unknown CPU", [])
    gpu = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
           else "no GPU")
    return (f"{platform.machine()}, {os.cpu_count()} CPUs ({name}; {' '.join(flags) or 'no listed extensions'}), "
            f"torch {torch.__version__}, {gpu}")
