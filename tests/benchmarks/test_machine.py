"""The machine line every benchmark's JSON carries (benchmarks/machine.py): the CPU model and the vector
extensions that decide a CPU figure, read from /proc/cpuinfo."""

from __future__ import annotations

import platform

from benchmarks.machine import cpu_model, describe_machine

XEON = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile
"""
EPYC = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"


def test_cpu_model_names_the_cpu_and_the_extensions_that_set_its_speed() -> None:
    assert cpu_model(XEON) == ("Intel(R) Xeon(R) Platinum 8488C", ["avx2", "avx512f", "avx512_bf16", "amx_bf16"])
    assert cpu_model(EPYC) == ("AMD EPYC", ["avx2", "avx512f", "avx512_bf16"])
    assert cpu_model("processor\t: 0\n") == ("unknown CPU", [])


def test_describe_machine_tells_two_machines_of_one_kind_apart() -> None:
    xeon, epyc = describe_machine(XEON), describe_machine(EPYC)
    assert xeon != epyc
    assert "Xeon" in xeon and "amx_bf16" in xeon and "amx_bf16" not in epyc
    assert xeon.startswith(f"{platform.machine()}, ") and "torch " in xeon
    assert describe_machine()  # this machine's own, whatever it is
