"""Atomic files and checked reads: how every file of a run directory is written and trusted again.

Every file is written to a temporary name, flushed to disk and renamed, so it is complete or absent. A
JSON marker that closes a stage can carry the size and SHA-256 of the files the stage wrote
(``write_sealed_json``), so that a truncated or edited file left by an earlier crash is detected and the
stage redone, never silently read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

logger = logging.getLogger(__name__)


def fsync_file(path: Path) -> None:
    """Flush one file's blocks to disk."""
    # Flushed before the rename: after a power loss the final name never points at a file whose
    # blocks were not written yet (rename-then-crash can otherwise leave a zero-length file).
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def partial_path(path: str | os.PathLike) -> Path:
    """Where ``path`` (a file or a directory) is written before it is renamed into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path for a writer that wants a file name (e.g. ``savefig``); rename it to ``path``
    when the block ends without error, so the file is complete or absent."""
    tmp = partial_path(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` via a temporary file and ``os.replace``: the file is complete or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(text)
        fsync_file(tmp)
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


def read_jsonl_checked(path: str | os.PathLike, expected: int) -> list[dict[str, Any]] | None:
    """The rows of a JSONL file written by ``write_jsonl_atomic``; None if it is missing, or (logged) if
    it does not parse or holds another number of rows than ``expected``: its stage is then redone."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, ValueError):
        rows = None
    if rows is None or len(rows) != expected:
        logger.warning("%s is truncated or corrupt (an earlier crash?): redoing it", path)
        return None
    return rows
