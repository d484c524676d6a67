"""Every error mft_ray raises on purpose, and the exit code each one means to a job.

A job (``jobs.common.run_cli``) prints an ``MftError`` as one line and exits with its ``exit_code``;
anything else is a bug and keeps its traceback. The codes:

    2  bad input: a setting, a data file, a run directory's records, a report's inputs
    3  resources: the cluster cannot hold (or place) what the job asks for
    4  a model cannot be loaded or served (an engine error, an endpoint that fails for good)
    5  a finetune failed for good (its Ray Train workers died more than ``finetune.max_failures`` times)

Each class also derives from the builtin the code raised before this module existed (``ValueError``
for most bad input, ``RuntimeError`` for records, resources, models and finetunes), so callers that catch
those keep working.
"""

from __future__ import annotations

EXIT_INPUT, EXIT_RESOURCES, EXIT_MODEL, EXIT_FINETUNE = 2, 3, 4, 5


class MftError(Exception):
    """Base of every expected failure; ``exit_code`` is what a job exits with."""

    exit_code: int = 1


class ConfigError(MftError, ValueError):
    """A setting is missing, unknown or out of range; the message names the setting."""

    exit_code = EXIT_INPUT


class DataError(MftError, ValueError):
    """Malformed input data. The message names the file and the 1-based line (JSONL) or row (Parquet)."""

    exit_code = EXIT_INPUT


class RecordsError(MftError, RuntimeError):
    """A run directory holds records that do not match this run."""

    exit_code = EXIT_INPUT


class ExportError(MftError, ValueError):
    """An example cannot be expressed in the hosted fine-tuning format; the message says which and why."""

    exit_code = EXIT_INPUT


class ServiceError(ConfigError):
    """No debate service by that name, one already running, or the service died; the message says which."""


class ReportInputError(ConfigError):
    """A run directory given to the report is missing or holds no readable results."""


class PlacementError(MftError, RuntimeError):
    """The cluster cannot hold the requested actors; the message says what was asked and what exists."""

    exit_code = EXIT_RESOURCES


class ModelError(MftError, RuntimeError):
    """A model cannot be loaded, served or trained as it is (its files, its chat template)."""

    exit_code = EXIT_MODEL


class EngineError(ModelError):
    """An engine could not be built or could not serve a request; the message says why."""


class ScoringNotSupported(EngineError, NotImplementedError):
    """The engine cannot score given text (e.g. a chat-completions API that returns no prompt log-probs)."""


class TemplateError(ModelError, ValueError):
    """The chat template does not render conversation prefixes as token prefixes."""


class FinetuneError(MftError, RuntimeError):
    """A finetune failed for good (its workers died more than ``finetune.max_failures`` times, or raised)."""

    exit_code = EXIT_FINETUNE


def root_cause(exc: BaseException) -> BaseException:
    """The error a remote task or actor raised, out of Ray's wrappers (one per hop: agent -> coordinator
    -> driver). Ray re-raises a remote error as a ``RayTaskError`` whose ``.cause`` is the original; its
    own text is the whole remote traceback, so the original's message is the one to show."""
    for _ in range(16):
        cause = getattr(exc, "cause", None)
        if not isinstance(cause, BaseException) or cause is exc:
            break
        exc = cause
    return exc


def one_line(message: object) -> str:
    """A possibly multi-line error message as one line."""
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())
