"""Reading a task's data files (JSONL, a JSON array, Parquet) with errors that name the file and line."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Iterator

from mft_ray.errors import DataError

logger = logging.getLogger(__name__)

def read_rows(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(number, record)`` for each record of a JSONL, JSON or Parquet file.

    ``number`` is the 1-based line of a JSONL file (blank lines are skipped but counted), the 1-based
    item of a JSON array, or the 1-based row of a Parquet file. Raises DataError naming the file and
    line for invalid JSON or a record that is not an object, and naming the file for an unreadable or
    unsupported file. The file type is checked before the first record is requested.
    """
    local = Path(path).expanduser()
    suffix = local.suffix.lower()
    if suffix not in (".jsonl", ".json", ".parquet"):
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; expected .jsonl, .json or .parquet")
    if not local.is_file():
        raise DataError(f"{path}: no such file")
    if suffix == ".parquet":
        return _read_parquet(path, local)
    return _read_json(path, local)


def _read_json(path: str, local: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with local.open("rb") as handle:
        head = handle.read(4096).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    if head.startswith("["):
        yield from _read_json_array(path, local)
        return
    with local.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid UTF-8: {exc}") from exc
            if lineno == 1:
                line = line.lstrip("\ufeff")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
            yield lineno, _as_object(record, path, lineno)


def _read_json_array(path: str, local: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        items = json.loads(local.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8: {exc}") from exc
    for number, record in enumerate(items, start=1):
        yield number, _as_object(record, path, number)


def _read_parquet(path: str, local: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq  # only Parquet users pay for the import

    try:
        reader = pq.ParquetFile(local)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: cannot read Parquet file: {exc}") from exc
    rowno = 0
    batches = reader.iter_batches(batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
            records = [] if batch is None else batch.to_pylist()
        except Exception as exc:  # a corrupt page or column chunk shows up only when it is read
            raise DataError(f"{path}:{rowno + 1}: cannot read Parquet rows from here on: {exc}") from exc
        if batch is None:
            return
        for record in records:
            rowno += 1
            yield rowno, record


def _as_object(record: Any, path: str, lineno: int) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    return record


def require(
    record: dict[str, Any],
    field: str,
    path: str,
    lineno: int,
    types: type | tuple[type, ...] = str,
) -> Any:
    """``record[field]``, or DataError ``"{path}:{lineno}: missing field '{field}'"`` / wrong type."""
    if record.get(field) is None:
        raise DataError(f"{path}:{lineno}: missing field {field!r}")
    return check_type(record[field], field, path, lineno, types)


def record_id(record: dict[str, Any], field: str, prefix: str, path: str, lineno: int) -> str:
    """The row's own id from ``field`` if present, else ``"{prefix}:{file stem}:{line}"``."""
    given = optional(record, field, path, lineno, (str, int))
    return str(given) if given is not None else f"{prefix}:{Path(path).stem}:{lineno}"


def optional(
    record: dict[str, Any],
    field: str,
    path: str,
    lineno: int,
    types: type | tuple[type, ...] = str,
) -> Any:
    """``record[field]`` checked like ``require``, or None when the field is absent or null."""
    if record.get(field) is None:
        return None
    return check_type(record[field], field, path, lineno, types)


def check_type(value: Any, field: str, path: str, lineno: int, types: type | tuple[type, ...]) -> Any:
    """Return ``value`` if it has one of ``types`` (bool never counts as a number), else DataError."""
    wanted = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, wanted) or (isinstance(value, bool) and bool not in wanted):
        names = " or ".join(t.__name__ for t in wanted)
        raise DataError(f"{path}:{lineno}: field {field!r} must be {names}, got {type(value).__name__}")
    return value


def normalize_subject(subject: str) -> str:
    """Compare subject names loosely: ``Counting & Probability`` matches ``counting_and_probability``."""
    return re.sub(r"[^a-z0-9]", "", subject.lower().replace("&", "and"))
