"""Per-agent finetuning sets in OpenAI's fine-tuning chat JSONL, for models finetuned through an API.

Each line is ``{"messages": [...]}`` with role/content messages, the assistant target last. A critic
example keeps ``"weight": 0`` on its round-1 reply (OpenAI's own convention, which the sets already
use), so a hosted finetune, like the local one, learns only the critic turns. Nothing here talks to
the network: docs/hosted_models.md says how to upload the files and start the jobs.

    from mft_ray.methods.openai_export import export_datasets_dir
    export_datasets_dir("runs/x/iter_1/datasets", "runs/x/iter_1/openai_finetune")

writes ``generator_<n>.jsonl`` and ``critic_<n>.jsonl`` (one per agent with examples) and, last,
``manifest.json`` (examples per file, files skipped because empty, sets below the API's minimum).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from mft_ray.errors import ExportError
from mft_ray.methods.datasets import Example
from mft_ray.run.files import write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

# OpenAI refuses a fine-tuning job with fewer training examples than this.
OPENAI_MIN_EXAMPLES = 10
MANIFEST = "manifest.json"
_ROLES = ("system", "user", "assistant")


def openai_example(example: Example, where: str = "example") -> dict[str, Any]:
    """``example`` (``{"messages": [...], ...}``) as one OpenAI fine-tuning line.

    Keeps only ``role``, ``content`` and, on assistant messages, ``weight`` (0 or 1); drops other keys
    (``problem_id``), which the API would reject. Raises ``ExportError`` if the last message is not an
    assistant reply or if no assistant message carries weight.
    """
    messages = example.get("messages") if isinstance(example, Mapping) else None
    if not isinstance(messages, list) or not messages:
        raise ExportError(f"{where}: no 'messages' list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise ExportError(f"{where}: message {i} needs a role in {list(_ROLES)} and string content, got {m!r}")
        msg: dict[str, Any] = {"role": m["role"], "content": m["content"]}
        if "weight" in m:
            if m["role"] != "assistant" or m["weight"] not in (0, 1):
                raise ExportError(f"{where}: message {i}: weight must be 0 or 1 on an assistant message")
            msg["weight"] = int(m["weight"])
        out.append(msg)
    if out[-1]["role"] != "assistant":
        raise ExportError(f"{where}: the last message must be the assistant target, got role {out[-1]['role']!r}")
    if out[-1].get("weight", 1) == 0:
        raise ExportError(f"{where}: the assistant target (last message) has weight 0; nothing would be learned")
    return {"messages": out}


def export_sets(sets: Mapping[str, Sequence[Example]], out_dir: str | os.PathLike) -> dict[str, Any]:
    """Write each named set to ``<out_dir>/<name>.jsonl``; then ``manifest.json``; return the manifest.

    An empty set gets no file (the API refuses empty training files) and is listed under ``skipped``;
    a set with fewer than ``OPENAI_MIN_EXAMPLES`` examples is written but listed under
    ``below_minimum``. Every example is checked before anything is written, so a bad example leaves
    no partial export behind.
    """
    out = Path(out_dir)
    converted = {name: [openai_example(ex, f"{name} example {i}") for i, ex in enumerate(examples)]
                 for name, examples in sets.items()}
    manifest: dict[str, Any] = {"format": "openai-chat-finetune", "min_examples": OPENAI_MIN_EXAMPLES,
                                "files": {}, "skipped": [], "below_minimum": []}
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a stale manifest must not vouch for a half-new export
    for name, lines in sorted(converted.items()):
        if not lines:
            manifest["skipped"].append(name)
            (out / f"{name}.jsonl").unlink(missing_ok=True)
            logger.warning("API finetune export: %s has no examples; no file written", name)
            continue
        write_text_atomic("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), out / f"{name}.jsonl")
        manifest["files"][name] = {"path": f"{name}.jsonl", "examples": len(lines)}
        if len(lines) < OPENAI_MIN_EXAMPLES:
            manifest["below_minimum"].append(name)
            logger.warning("API finetune export: %s has %d examples; OpenAI needs at least %d",
                           name, len(lines), OPENAI_MIN_EXAMPLES)
    write_json_atomic(manifest, out / MANIFEST)  # last: marks the export complete
    logger.info("API finetune export: %d files under %s (%d skipped as empty)", len(manifest["files"]), out,
                len(manifest["skipped"]))
    return manifest



def export_datasets_dir(datasets_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Convert every ``*.jsonl`` set that ``jobs.iterate`` wrote under ``datasets_dir``."""
    src = Path(datasets_dir)
    files = sorted(src.glob("*.jsonl"))
    if not files:
        raise ExportError(f"{src}: no *.jsonl finetuning sets")
    sets: dict[str, list[Example]] = {}
    for f in files:
        rows = []
        for lineno, line in enumerate(f.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as exc:
                    raise ExportError(f"{f}:{lineno}: not JSON ({exc})") from None
        sets[f.stem] = rows
    return export_sets(sets, out_dir)
