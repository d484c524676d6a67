"""Debate records: one Arrow row per (problem, agent, role, round), stored as Parquet shards.

A shard is written to a temporary name and renamed into place, so it is either complete or absent.
On resume a shard is trusted only if its footer reads, its row count matches, and it holds exactly the
problems the shard should hold; anything else is reported and redone (or refused, if it belongs to a
different configuration).

The module also holds the run directory's other writers and checked readers: every file is written to
a temporary name, flushed to disk and renamed, and a JSON marker that closes a stage can carry the size
and SHA-256 of the files the stage wrote (``write_sealed_json``), so that a truncated or edited file
left by an earlier crash is detected and the stage redone, never silently read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

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
    ("majority", pa.string()),  # majority answer of the final round; null if nobody parsed
    ("tie", pa.bool_()),
    ("consensus", pa.float32()),
])


class RecordsError(RuntimeError):
    """A run directory holds records that do not match this run."""


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
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    # Flushed before the rename: after a power loss the final name never points at a file whose
    # blocks were not written yet (rename-then-crash can otherwise leave a zero-length file).
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rows_to_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=SCHEMA)


def write_shard(directory: str | os.PathLike, index: int, rows: Sequence[dict[str, Any]],
                problem_ids: Sequence[str]) -> Path:
    """Write one shard atomically; its metadata names the problems and the expected row count."""
    path = shard_path(directory, index)
    write_table_atomic(rows_to_table(rows), path, {"problem_ids": list(problem_ids), "rows": len(rows)})
    return path


def shard_is_complete(directory: str | os.PathLike, index: int, problem_ids: Sequence[str]) -> bool:
    """True if shard ``index`` exists, reads, and holds exactly ``problem_ids``.

    A corrupt or truncated file is deleted (and logged) so the caller redoes it. A readable shard
    for *other* problems means the run directory belongs to another configuration: refuse.
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
    return True


def read_records(directory: str | os.PathLike) -> pa.Table:
    """All shards of one debate directory as one table (shard order)."""
    files = sorted(Path(directory).glob("shard_*.parquet"))
    if not files:
        raise RecordsError(f"no debate records under {directory}")
    return pa.concat_tables([pq.read_table(f, schema=SCHEMA) for f in files])


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` via a temporary file and ``os.replace``: the file is complete or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(text)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented JSON, atomically (see ``write_text_atomic``)."""
    write_text_atomic(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def write_jsonl_atomic(rows: Iterable[dict[str, Any]], path: str | os.PathLike) -> None:
    """Write one JSON object per line, atomically (see ``write_text_atomic``)."""
    write_text_atomic("".join(json.dumps(r) + "\n" for r in rows), path)


# ---------------------------------------------------------------------------------------------
# Checked readers: a file left broken by an earlier crash is reported and removed, never trusted

SEAL_KEY = "_files"  # the key of a sealed marker that lists the stage's files; stripped on read


def _discard(path: Path, why: str) -> None:
    logger.warning("%s %s; removing it so that its stage is redone", path, why)
    path.unlink(missing_ok=True)


def read_json_checked(path: str | os.PathLike, repair: bool = True) -> Any | None:
    """The JSON in ``path``; None if it is missing, or unreadable (then it is logged, and removed if
    ``repair``: read-only callers such as ``mft status`` pass False and change nothing).

    Run-directory markers are written atomically, so an unreadable one can only come from outside
    (a crash of an older writer, a full disk, a hand edit): the stage it closes is redone.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        if repair:
            _discard(path, f"is not valid JSON ({exc})")
        else:
            logger.warning("%s is not valid JSON (%s)", path, exc)
        return None


def file_digest(path: str | os.PathLike) -> dict[str, Any]:
    """{"bytes": size, "sha256": hex digest} of one file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": os.path.getsize(path), "sha256": h.hexdigest()}


def write_sealed_json(obj: dict[str, Any], path: str | os.PathLike, files: Iterable[str | os.PathLike]) -> None:
    """Write the marker ``obj`` atomically, sealed with the size and SHA-256 of each of ``files``.

    ``files`` are the outputs of the stage the marker closes, already written; ``read_sealed_json``
    trusts the marker only while every one of them is unchanged. Names are stored relative to the
    marker's directory.
    """
    path = Path(path)
    seal = {os.path.relpath(f, path.parent): file_digest(f) for f in files}
    write_json_atomic({**obj, SEAL_KEY: seal}, path)


def read_sealed_json(path: str | os.PathLike) -> dict[str, Any] | None:
    """The marker written by ``write_sealed_json`` (without its seal), or None if the stage must be redone.

    None when the marker is missing, unreadable, unsealed, or when any sealed file is missing or differs
    in size or SHA-256 from what was written (a truncated or edited set): the marker is then removed and
    the reason logged.
    """
    path = Path(path)
    marker = read_json_checked(path)
    if marker is None:
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get(SEAL_KEY), dict):
        _discard(path, "lists no checksums of its files (written by an older version, or by hand)")
        return None
    for name, want in marker[SEAL_KEY].items():
        f = path.parent / name
        if not f.is_file():
            _discard(path, f"seals {name}, which is missing")
            return None
        got = file_digest(f)
        if got != want:
            _discard(path, f"seals {name} with {want['bytes']} bytes (sha256 {want['sha256'][:12]}), but it now has "
                           f"{got['bytes']} bytes (sha256 {got['sha256'][:12]}): truncated or changed")
            return None
    return {k: v for k, v in marker.items() if k != SEAL_KEY}
