"""Debate records: one Arrow row per (problem, agent, role, round), stored as Parquet shards.

A shard is written to a temporary name and renamed into place, so it is either complete or absent.
On resume a shard is trusted only if its footer reads, its row count matches, and it holds exactly the
problems the shard should hold; anything else is reported and redone (or refused, if it belongs to a
different configuration).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from mft_ray.errors import RecordsError
from mft_ray.run.files import fsync_file

logger = logging.getLogger(__name__)

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])

SCHEMA = pa.schema([
    ("iteration", pa.int32()),
    ("split", pa.string()),
    ("problem_id", pa.string()),
    ("agent", pa.int32()),  # 0-based agent index n; for summaries, the agent the summary is for
    ("role", pa.string()),  # generator | critic | summarizer
    ("round", pa.int32()),  # 1-based debate round m
    ("messages", pa.list_(MESSAGE)),  # the prompt conversation exactly as given to the engine
    ("response", pa.string()),
    ("answer", pa.string()),  # parsed final answer; null if unparseable (and for summaries)
    ("answer_rule", pa.string()),  # which rule read it (tasks.answers: boxed, answer_is, ...); null if none
    ("majority", pa.string()),  # majority answer of the final round; null if nobody parsed
    ("tie", pa.bool_()),
    ("consensus", pa.float32()),
    # Rounds m > 1: the other agents in the order this agent was shown their round m-1 responses (the
    # summary for agent n, and its critique, list them alike); null in round 1.
    ("others_order", pa.list_(pa.int32())),
])


def split_shards(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """Consecutive shards of ``size`` items: shard k holds items[k*size:(k+1)*size]."""
    return [items[i:i + size] for i in range(0, len(items), size)]


def shard_path(directory: str | os.PathLike, index: int) -> Path:
    return Path(directory) / f"shard_{index:05d}.parquet"


def write_table_atomic(table: pa.Table, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> None:
    """Write ``table`` to ``path`` via a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               b"mft": json.dumps(metadata).encode()})
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(table, tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def rows_to_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=SCHEMA)


def debate_settings(agents: int, rounds: int, summarize: bool, shuffle_others: bool) -> dict[str, Any]:
    """What a debate's records depend on besides its problems: kept in each shard, checked on resume."""
    return {"agents": agents, "rounds": rounds, "summarize": summarize, "shuffle_others": shuffle_others}


def write_shard(directory: str | os.PathLike, index: int, rows: Sequence[dict[str, Any]],
                problem_ids: Sequence[str], settings: dict[str, Any] | None = None) -> Path:
    """Write one shard atomically; its metadata names the problems, the row count and the debate ``settings``."""
    path = shard_path(directory, index)
    meta = {"problem_ids": list(problem_ids), "rows": len(rows)}
    if settings is not None:
        meta["debate"] = settings
    write_table_atomic(rows_to_table(rows), path, meta)
    return path


def shard_is_complete(directory: str | os.PathLike, index: int, problem_ids: Sequence[str],
                      settings: dict[str, Any] | None = None) -> bool:
    """True if shard ``index`` exists, reads, and holds exactly ``problem_ids`` (debated with ``settings``,
    when given).

    A corrupt or truncated file is deleted (and logged) so the caller redoes it. A readable shard
    for *other* problems, or of a debate with other settings (or from before shards recorded them), means
    the run directory belongs to another configuration or version: refuse.
    """
    path = shard_path(directory, index)
    if not path.exists():
        return False
    try:
        meta_raw = pq.read_schema(path).metadata or {}
        meta = json.loads(meta_raw[b"mft"])
        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as exc:  # noqa: BLE001 - any unreadable file is redone, never trusted
        logger.warning("shard %s is unreadable (%s); redoing it", path, exc)
        path.unlink(missing_ok=True)
        return False
    if rows != meta.get("rows"):
        logger.warning("shard %s has %d rows, expected %s; redoing it", path, rows, meta.get("rows"))
        path.unlink(missing_ok=True)
        return False
    if list(meta.get("problem_ids", [])) != list(problem_ids):
        raise RecordsError(
            f"{path} holds records for other problems than this run's shard {index}: the run directory "
            "was made with a different task, split or shard size; use a new run_dir"
        )
    if settings is not None and meta.get("debate") != settings:
        raise RecordsError(
            f"{path} holds a debate with other settings ({meta.get('debate') or 'from an older version'}) than "
            f"this run's {settings}: the run directory was made with another method, debate shape or version; "
            "use a new run_dir"
        )
    return True


def shard_files(directory: str | os.PathLike) -> list[Path]:
    """The shard files of one debate directory, in shard order (none if it does not exist)."""
    return sorted(Path(directory).glob("shard_*.parquet"))


def read_records(directory: str | os.PathLike) -> pa.Table:
    """All shards of one debate directory as one table (shard order)."""
    files = shard_files(directory)
    if not files:
        raise RecordsError(f"no debate records under {directory}")
    return pa.concat_tables([_conform(pq.read_table(f)) for f in files])


def _conform(table: pa.Table) -> pa.Table:
    """``table`` in SCHEMA's columns and types; a column that records of an older version lack is null."""
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
               for f in SCHEMA]
    return pa.Table.from_arrays(columns, schema=SCHEMA)
