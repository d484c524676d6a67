"""Checks that a Hugging Face checkpoint directory is whole before anything trusts it.

A finetune exports its checkpoint to a temporary sibling and renames it into place only when every
file is written (``mft_ray.training.loop``), with a manifest (``MANIFEST_NAME``) listing each file and
its size. A directory found later can still be broken: copied half-way, hit by a full disk or a crash
of an older writer, or edited by hand. ``checkpoint_problem`` says what is wrong without loading the
weights: JSON files must parse, every manifest entry must have its size, and a safetensors file's
header must describe exactly the bytes the file holds (a truncated file never does).
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

from mft_ray.models.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapter

logger = logging.getLogger(__name__)

MANIFEST_NAME = "checkpoint_manifest.json"
METRICS_NAME = "train_metrics.json"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors caps its JSON header at 100 MB


def write_manifest(directory: str | os.PathLike) -> dict[str, int]:
    """List every file under ``directory`` with its size in ``MANIFEST_NAME`` (written last, fsynced)."""
    root = Path(directory)
    files = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))
             if p.is_file() and p.name != MANIFEST_NAME}
    path = root / MANIFEST_NAME
    with open(path, "w") as f:
        json.dump({"files": files}, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return files


def fsync_tree(directory: str | os.PathLike) -> None:
    """Flush every file under ``directory`` to disk (before the directory is renamed into place)."""
    for p in Path(directory).rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"{path.name} is not valid JSON ({exc})"
    return None


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why a .safetensors file is not whole (None if its header matches its size)."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is {size} bytes, shorter than a safetensors header"
            n = int.from_bytes(head, "little")
            if n > min(size - 8, _MAX_HEADER):
                return f"{path.name}: header length {n} exceeds the file ({size} bytes)"
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        return f"{path.name}: unreadable safetensors header ({exc})"
    expected = 8 + n + max(ends, default=0)
    if expected != size:
        return f"{path.name} is {size} bytes, its header describes {expected}: truncated"
    return None


def _weights_problem(root: Path) -> str | None:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = root / index_name
        if index.is_file():
            if (why := _json_problem(index)) is not None:
                return why
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
            if not shards:
                return f"{index_name} lists no weight files"
            for name in shards:
                if (why := _weight_file_problem(root / name)) is not None:
                    return why
            return None
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (root / name).is_file():
            return _weight_file_problem(root / name)
    return "no weights (model.safetensors, pytorch_model.bin or a sharded index)"


def _weight_file_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"{path.name} is missing"
    if path.suffix == ".safetensors":
        return safetensors_problem(path)
    if not zipfile.is_zipfile(path):  # torch's format is a zip archive: a truncated one has no directory
        return f"{path.name} is not a whole torch archive"
    return None


def checkpoint_problem(path: str | os.PathLike, require_metrics: bool = True) -> str | None:
    """What makes ``path`` not a whole checkpoint, or None if it is one.

    ``require_metrics``: also require the finetune's ``train_metrics.json`` (what marks one of our
    exports; a base model has none). A LoRA adapter directory (``adapter_config.json``) is checked the same
    way, with its adapter weights in place of the model's.
    """
    root = Path(path)
    if not root.is_dir():
        return "no such directory"
    adapter = is_adapter(root)
    head = ADAPTER_CONFIG if adapter else "config.json"
    if not (root / head).is_file():
        return "no config.json"
    names = [head] + ([METRICS_NAME] if require_metrics else [])
    for name in names:
        if not (root / name).is_file():
            return f"no {name}"
        if (why := _json_problem(root / name)) is not None:
            return why
    manifest = root / MANIFEST_NAME
    if manifest.is_file():
        if (why := _json_problem(manifest)) is not None:
            return why
        listed: dict[str, Any] = json.loads(manifest.read_text()).get("files", {})
        for name, size in listed.items():
            f = root / name
            if not f.is_file():
                return f"{name} is missing (listed in {MANIFEST_NAME})"
            if f.stat().st_size != size:
                return f"{name} is {f.stat().st_size} bytes, {MANIFEST_NAME} says {size}: truncated or changed"
    elif require_metrics:
        # Exports of older versions carry no manifest: the metrics file was written last, so its
        # presence (checked above) still marks a finished export; the weights are checked below.
        logger.debug("%s has no %s", root, MANIFEST_NAME)
    if adapter:
        weights = root / ADAPTER_WEIGHTS
        return safetensors_problem(weights) if weights.is_file() else f"no {ADAPTER_WEIGHTS}"
    return _weights_problem(root)


def checkpoint_is_complete(path: str | os.PathLike) -> bool:
    """True if ``path`` holds a whole exported finetune checkpoint (see ``checkpoint_problem``)."""
    return checkpoint_problem(path) is None


def read_train_metrics(path: str | os.PathLike) -> dict[str, Any]:
    """The training metrics a finetune exported with its checkpoint (``METRICS_NAME`` in ``path``)."""
    return json.loads((Path(path) / METRICS_NAME).read_text())
