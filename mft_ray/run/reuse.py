"""Iteration-0 debates shared between the runs of a study.

At iteration 0 every method's society is the base model, and a debate's sampling seeds depend only on the
iteration, split, shard, round and member (``actors.coordinator``), never on the method. So two runs whose
iteration-0 debate of a split has the same settings (model and the base model it resolves to, task and
problems, sampling, agents, rounds, summarizer, prompt style, engine sharing, seed) would run the very same
debate: Multiagent FT and Single-agent FT debate
the same N x M society on both splits before either finetunes, and a LoRA society's iteration 0 is its full
twin's. ``jobs.study`` copies such a debate from a run that has it (judged by the config that run last ran
with) into one that has not started it, so the
study pays for it once and the methods start from paired data. The copied shards are checked as any
resumed shard is (their problems and debate settings, ``records.shard_is_complete``) when the run reads
them; a shard the source lacks is debated as usual. What was copied, and from where, is written to
``iter_0/reused.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from mft_ray.config import Config, config_from_dict
from mft_ray.errors import MftError
from mft_ray.methods.registry import get_method, method_config
from mft_ray.models.adapters import split_weights
from mft_ray.run.files import read_json_checked, write_json_atomic
from mft_ray.run.records import shard_files
from mft_ray.run.rundir import RunDir

logger = logging.getLogger(__name__)

# Split -> the stage whose society debates it (mft_ray.algorithm: "collect" debates the finetune split).
STAGES = {"eval": "evaluate", "finetune": "collect"}


def debate_identity(config: Config, split: str) -> dict[str, Any] | None:
    """Everything that decides the records of ``config``'s iteration-0 debate of ``split``; None when the run
    has no such debate (the finetune split of an evaluation-only method or of ``finetune.iterations=0``).
    Two runs with equal identities would write the same records."""
    if split not in STAGES:
        raise ValueError(f"split must be one of {list(STAGES)}, got {split!r}")
    c = method_config(config, STAGES[split])
    if split == "finetune" and c.finetune.iterations == 0:
        return None
    data = c.to_dict()
    debate = {k: v for k, v in data["debate"].items() if k != "shards_in_flight"}  # scheduling, not records
    # Which members an engine serves seeds its calls (actors.coordinator), and GPUs change the dtype.
    placement = {k: data["resources"][k] for k in ("share_engine", "num_gpus_per_agent")}
    return {"seed": data["seed"], "task": data["task"], "model": data["model"], "sampling": data["sampling"],
            "debate": debate, "placement": placement, "prompt_style": get_method(c.method).prompt_style}


def ran_config(root: str | os.PathLike) -> Config | None:
    """The config the run in ``root`` last ran with (its saved ``config.yaml``, ``run_dir`` set to where it
    is now); None, with a warning, when there is none or it no longer loads."""
    run = RunDir(root)
    try:
        saved = run.saved_config()
        return None if saved is None else dataclasses.replace(config_from_dict(saved), run_dir=str(run.root))
    except MftError as exc:
        logger.warning("%s: not offered for reuse (%s)", run.root, exc)
        return None


def reuse_iteration0(dst_config: Config, src_root: str | os.PathLike) -> list[str]:
    """Copy into ``dst_config``'s run each iteration-0 debate of the run in ``src_root`` that the two would
    run identically: the same ``debate_identity`` (the source's from the config it ran with) and the same
    base model (the source's ``base_model.txt``). Only where the source has shards and the destination has
    not begun that debate; never over a run of another method. Returns the splits copied."""
    src, dst = RunDir(src_root), RunDir(dst_config.run_dir)
    src_config = ran_config(src.root)
    if src.root == dst.root or src_config is None or dst.saved_method() not in (None, dst_config.method):
        return []
    if src.saved_base_model() != split_weights(dst_config.model.path)[0]:  # e.g. a built-in model since rebuilt
        return []
    copied = []
    for split in STAGES:
        identity = debate_identity(dst_config, split)
        if identity is None or identity != debate_identity(src_config, split):
            continue
        source, target = src.debate_dir(0, split), dst.debate_dir(0, split)
        shards = shard_files(source)
        if not shards or target.exists():
            continue
        staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")  # renamed whole into place
        staging.mkdir(parents=True)
        try:
            for shard in shards:
                _link_or_copy(shard, staging / shard.name)
            os.rename(staging, target)  # fails, copying nothing, if a run began this debate meanwhile
        except OSError as exc:
            logger.warning("%s: iteration 0's %s debate not reused from %s (%s)", dst.root, split, source, exc)
            continue
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        copied.append(split)
        logger.info("%s: iteration 0's %s debate (%d shards) reused from %s: same base model, settings, seeds and "
                    "problems", dst.root.name, split, len(shards), source)
    if copied:
        marker = dst.reused_path(0)  # split -> the debate folder its shards came from
        saved = read_json_checked(marker)
        saved = saved if isinstance(saved, dict) else {}
        write_json_atomic({**saved, **{split: str(src.debate_dir(0, split)) for split in copied}}, marker)
    return copied


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (shards are never rewritten in place: a redone shard replaces the file), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
