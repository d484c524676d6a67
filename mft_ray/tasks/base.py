"""The task interface, the ``Problem`` record, and helpers shared by every task.

A task knows three things: how to load its pool of problems, how to read a model's final answer out of
a response, and when two answers are the same. Everything downstream (debate, voting, dataset
construction, evaluation) goes through this interface and never looks at task-specific details.
"""

from __future__ import annotations

import json
import logging
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar, Iterator

from mft_ray.config import TaskConfig
from mft_ray.errors import DataError

logger = logging.getLogger(__name__)

MATH_INSTRUCTION = "Put your final answer in the form \\boxed{answer} at the end of your response."


@dataclass(frozen=True)
class Problem:
    """One problem of a task.

    Attributes:
        id: stable identifier, unique within the task's pool.
        question: the full text shown to the model (for MMLU it includes the lettered choices).
        answer: the ground-truth final answer as a string.
        meta: extra information (subject, level, source line, ...); ignored by ``==`` and ``hash``.
    """

    id: str
    question: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


class Task(ABC):
    """A benchmark: a pool of problems plus answer extraction and an equivalence grader.

    Subclasses set ``name`` and implement ``_load``, ``extract_answer`` and ``equivalent``. The pool is
    loaded once and cached, so ``load()`` may be called any number of times.
    """

    name: ClassVar[str]
    answer_instruction: ClassVar[str] = MATH_INSTRUCTION
    #: False for generated tasks, which read no file (``task.path`` / ``task.eval_path`` do not apply).
    uses_path: ClassVar[bool] = True

    def __init__(self, config: TaskConfig) -> None:
        self.config = config
        self._pool: list[Problem] | None = None

    def load(self) -> list[Problem]:
        """Return the whole pool of problems (after any filters), in a deterministic order."""
        if self._pool is None:
            pool = self._load()
            _check_unique_ids(pool, self.source_description())
            logger.info("%s: loaded %d problems from %s", self.name, len(pool), self.source_description())
            self._pool = pool
        # A fresh list so callers can reorder it without touching the cache; Problems are immutable.
        return list(self._pool)

    def is_correct(self, predicted: str | None, reference: str) -> bool:
        """True when ``predicted`` is equivalent to the ground truth; an unparseable answer never is."""
        if predicted is None:
            return False
        return self.equivalent(reference, predicted)

    def source_description(self) -> str:
        """Where the pool comes from, for error messages (a path plus any filters applied)."""
        return str(self.config.path)

    def _require_path(self) -> str:
        if self.config.path is None:
            raise ValueError(f"task.path is required for task {self.name!r}")
        return self.config.path

    @abstractmethod
    def _load(self) -> list[Problem]:
        """Build the pool; called once by ``load``."""

    @abstractmethod
    def extract_answer(self, text: str) -> str | None:
        """The final answer written in a model response, or None when there is none."""

    @abstractmethod
    def equivalent(self, a: str, b: str) -> bool:
        """Whether two answers are the same. Where the grader is asymmetric, ``a`` plays the reference."""


def _check_unique_ids(pool: list[Problem], source: str) -> None:
    seen: set[str] = set()
    for problem in pool:
        if problem.id in seen:
            where = f"{source}:{problem.meta['line']}" if "line" in problem.meta else source
            raise DataError(f"{where}: duplicate problem id {problem.id!r}")
        seen.add(problem.id)


# ---------------------------------------------------------------------------------------------
# Answer extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_OLD_BOX_TOKEN_RE = re.compile(r"[^\s$]+")


def last_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` (or ``\fbox{...}``) in ``text``, found by brace matching.

    Nested braces work (``\boxed{\frac{1}{2}}`` gives ``\frac{1}{2}``). An occurrence whose braces never
    close is skipped in favour of the one before it. The old ``\boxed 5`` form is read up to the next
    whitespace or ``$``. Returns None when there is no usable box.
    """
    for match in reversed(list(_BOX_RE.finditer(text))):
        content = _box_content(text, match.end())
        if content is not None:
            return content
    return None


def _box_content(text: str, start: int) -> str | None:
    i = start
    while i < len(text) and text[i].isspace():
        i += 1
    if i < len(text) and text[i] == "{":
        return _match_braces(text, i)
    if i == start:
        return None  # e.g. "\boxed5" or "\boxed" at the end: not a form we read
    token = _OLD_BOX_TOKEN_RE.match(text, i)
    if token is None:
        return None
    # "$\boxed 2.$" style: the full stop ends the sentence, it is not part of the answer.
    content = token.group(0).rstrip(".")
    return content or None


def _match_braces(text: str, open_at: int) -> str | None:
    depth = 0
    i = open_at
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # escaped character such as \{ or \}: not a grouping brace
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
        i += 1
    return None


# ---------------------------------------------------------------------------------------------
# Numeric answers (arithmetic, GSM8K)

_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_FRAC_RE = re.compile(r"([-+]?)\\[dt]?frac\{?([-+]?\d+)\}?\{?(\d+)\}?")
_SLASH_RE = re.compile(r"([-+]?\d+)\s*/\s*(\d+)")
_DECIMAL_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_WORDS_RE = re.compile(r"[A-Za-z\s=:]*")
_REL_TOL = Fraction(1, 10**6)


def parse_number(text: str) -> Fraction | None:
    r"""Read ``text`` as one number: ``1,000``, ``$5``, ``5.0``, ``-3``, ``\frac{1}{2}``, ``3/4``, ``18 dollars``.

    Returns None when the text holds no number or more than one (``10-3`` is not read as a number).
    """
    s = _TEXT_RE.sub(r" \1 ", text)
    for junk in ("\\$", "$", "\\!", "\\,", "\\;", "\\%", "%", "{,}", "\\left", "\\right"):
        s = s.replace(junk, " " if junk in ("\\,", "\\;") else "")
    s = _THOUSANDS_RE.sub("", s).strip().rstrip(".").strip()
    if _DECIMAL_RE.fullmatch(s):
        return _to_fraction(s)
    frac = _FRAC_RE.fullmatch(s)
    if frac:
        sign, num, den = frac.groups()
        value = _ratio(num, den)
        return -value if value is not None and sign == "-" else value
    slash = _SLASH_RE.fullmatch(s)
    if slash:
        return _ratio(slash.group(1), slash.group(2))
    # Units or words around the number ("18 dollars", "x = 5"): accept exactly one number and nothing
    # else that could be maths ("\sqrt{2}" or "2\pi" must not read as 2).
    numbers = _DECIMAL_RE.findall(s)
    if len(numbers) == 1 and _WORDS_RE.fullmatch(s.replace(numbers[0], " ", 1)):
        return _to_fraction(numbers[0])
    return None


def _ratio(num: str, den: str) -> Fraction | None:
    try:
        numerator, denominator = int(num), int(den)
    except ValueError:  # more digits than Python converts from a string
        return None
    return None if denominator == 0 else Fraction(numerator, denominator)


def _to_fraction(s: str) -> Fraction | None:
    try:
        return Fraction(Decimal(s))
    except (InvalidOperation, ValueError):
        return None


def numbers_equal(a: str, b: str) -> bool:
    """Numeric equivalence (relative tolerance 1e-6); answers that are not numbers compare as text."""
    x, y = parse_number(a), parse_number(b)
    if x is not None and y is not None:
        return abs(x - y) <= _REL_TOL * max(Fraction(1), abs(x), abs(y))
    if x is not None or y is not None:
        return False
    sa, sb = squash(a).lower(), squash(b).lower()
    return bool(sa) and sa == sb


def squash(text: str) -> str:
    """``text`` without any whitespace, for exact comparisons that ignore spacing."""
    return "".join(text.split())


class BoxedTask(Task, ABC):
    r"""A task whose final answer is the content of the last ``\boxed{}`` of a response."""

    def extract_answer(self, text: str) -> str | None:
        content = last_boxed(text)
        if content is None or not content.strip():
            return None
        return content.strip()


class NumericTask(BoxedTask, ABC):
    r"""A task whose answers are numbers written in ``\boxed{}``."""

    def equivalent(self, a: str, b: str) -> bool:
        return numbers_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Reading files


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
