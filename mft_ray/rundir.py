"""Layout of a run directory. Every stage writes here, so a job can resume and a person can inspect.

    <run_dir>/config.yaml                       resolved config of the latest launch
    <run_dir>/base_model.txt                    the base model's resolved path (jobs.iterate)
    <run_dir>/iter_<l>/debate_<split>/shard_*.parquet   debate records
    <run_dir>/iter_<l>/metrics.json             evaluation of iteration l (Algorithm 2)
    <run_dir>/iter_<l>/datasets/<role>_<n>.jsonl  finetuning sets built from iteration l-1's debate
    <run_dir>/iter_<l>/datasets/counts.json     set sizes (written last: marks the stage done, and
                                                seals each set's size and SHA-256)
    <run_dir>/iter_<l>/<role>_<n>/              finetuned Hugging Face checkpoints (with a manifest)
    <run_dir>/iter_<l>/ray_train/<role>_<n>/    Ray Train checkpoints of an unfinished finetune
    <run_dir>/iter_<l>/society.json             which weights each member of society l uses
    <run_dir>/metrics.json                      every iteration's metrics and dataset sizes
    <run_dir>/results.md, accuracy.png          the results table and plot (jobs.iterate, at the end)

Every file is written under a temporary name and renamed into place (``mft_ray.records``); what a
later run reads back is checked first (``read_json_checked``, ``read_sealed_json``,
``records.shard_is_complete``, ``checkpoints.checkpoint_problem``), so a file broken by an earlier
crash makes its stage run again instead of being read.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from mft_ray.checkpoints import checkpoint_problem
from mft_ray.config import Config, ConfigError, dump_config
from mft_ray.records import read_json_checked, write_text_atomic

logger = logging.getLogger(__name__)


class RunDir:
    def __init__(self, root: str | os.PathLike) -> None:
        # Absolute: Ray Train's storage path must be a URI or an absolute path, and actors and
        # finetune workers need not share the driver's working directory.
        self.root = Path(root).expanduser().absolute()

    def iteration_dir(self, iteration: int) -> Path:
        return self.root / f"iter_{iteration}"

    def debate_dir(self, iteration: int, split: str) -> Path:
        return self.iteration_dir(iteration) / f"debate_{split}"

    def metrics_path(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "metrics.json"

    def datasets_dir(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "datasets"

    def agent_dir(self, iteration: int, member: str) -> Path:
        return self.iteration_dir(iteration) / member

    def society_path(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "society.json"

    def read_society(self, iteration: int, repair: bool = True) -> dict[str, str] | None:
        """Member name -> weights of society ``iteration``; None if that society is not built yet.

        Also None (with a warning) when ``society.json`` does not parse, or when a checkpoint it names
        inside this run directory is not whole (``mft_ray.checkpoints.checkpoint_problem``): the
        finetuning stage is then redone instead of a later stage loading broken weights. A broken
        ``society.json`` is removed unless ``repair`` is False (callers that only read another run).
        """
        path = self.society_path(iteration)
        saved = read_json_checked(path, repair)
        if saved is None:
            return None
        if not isinstance(saved, dict) or not all(isinstance(v, str) for v in saved.values()):
            logger.warning("%s is not a member -> weights mapping", path)
            if repair:  # removed so that the society is rebuilt; nothing that looks complete is left
                path.unlink(missing_ok=True)
            return None
        for member, weights in saved.items():
            where = Path(weights)
            if where.is_absolute() and where.is_relative_to(self.root):
                why = checkpoint_problem(where)
                if why is not None:
                    logger.warning("society %d: %s's checkpoint %s is broken (%s); its finetune is redone",
                                   iteration, member, where, why)
                    return None
        return saved

    @property
    def summary_path(self) -> Path:
        return self.root / "metrics.json"

    def check_base_model(self, model: str) -> None:
        """Refuse a run directory started from another base model: its finished stages would be reused as
        this model's results. A rebuilt built-in model (a new testbed recipe) resolves to a new directory,
        so rerunning ``make demo`` after an upgrade fails here instead of reprinting the old table."""
        previous = self._saved_base_model()
        if previous and previous != model:
            raise ConfigError(f"run_dir {str(self.root)!r} was started from base model {previous!r}, not "
                              f"{model!r}; its finished stages would be reused: use another run_dir or remove it")

    def record_base_model(self, model: str) -> None:
        """Write what ``check_base_model`` compares against (after ``prepare``; once, so a resume rewrites
        nothing it finished)."""
        if self._saved_base_model() != model:
            write_text_atomic(model + "\n", self.base_model_path)

    @property
    def base_model_path(self) -> Path:
        return self.root / "base_model.txt"

    def _saved_base_model(self) -> str:
        return self.base_model_path.read_text().strip() if self.base_model_path.is_file() else ""

    def prepare(self, config: Config) -> None:
        """Create the directory (refusing an unwritable one clearly) and save the config."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{uuid.uuid4().hex}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"run_dir {str(self.root)!r} is not writable: {exc.strerror or exc}") from exc
        write_text_atomic(dump_config(config), self.root / "config.yaml")
