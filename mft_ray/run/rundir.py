"""Layout of a run directory: the one owner of every file name in it, and of every "is this stage done?".

    <run_dir>/config.yaml                       resolved config of the latest launch
    <run_dir>/base_model.txt                    the base model's resolved path (jobs.iterate)
    <run_dir>/iter_<l>/debate_<split>/shard_*.parquet   debate records
    <run_dir>/iter_<l>/metrics.json             evaluation of iteration l (Algorithm 2)
    <run_dir>/iter_<l>/diversity.json           its diversity figures and the settings they depend on
    <run_dir>/iter_<l>/star_rationalizations.jsonl   STaR's hinted answers (method=star only)
    <run_dir>/iter_0/reused.json                which iteration-0 debates came from another run of a study
                                                (``mft_ray.run.reuse``), and from where
    <run_dir>/iter_<l>/datasets/<unit>.jsonl    finetuning sets built from iteration l-1's debate
    <run_dir>/iter_<l>/datasets/counts.json     set sizes (written last: marks the stage done, and
                                                seals each set's size and SHA-256)
    <run_dir>/iter_<l>/<unit>/                  finetuned Hugging Face checkpoints (with a manifest)
    <run_dir>/iter_<l>/ray_train/<unit>/        Ray Train checkpoints of an unfinished finetune
    <run_dir>/iter_<l>/finetunes.json           each finetune's training metrics
    <run_dir>/iter_<l>/society.json             which weights each member of society l uses (last)
    <run_dir>/metrics.json                      every iteration's metrics and dataset sizes
    <run_dir>/results.md, accuracy.png          the results table and plot (jobs.iterate, at the end)

Every file is written under a temporary name and renamed into place (``mft_ray.run.files``); what a
later run reads back is checked first (``read_json_checked``, ``read_sealed_json``,
``records.shard_is_complete``, ``training.export.checkpoint_problem``), so a file broken by an earlier
crash makes its stage run again instead of being read.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any, Sequence

import yaml

from mft_ray.config import Config, dump_config
from mft_ray.errors import ConfigError
from mft_ray.run.files import read_json_checked, read_sealed_json, write_sealed_json, write_text_atomic
from mft_ray.run.records import shard_is_complete, split_shards
from mft_ray.training.export import checkpoint_problem

logger = logging.getLogger(__name__)

DEFAULT_METHOD = "multiagent_ft"  # what a config.yaml without a ``method`` ran (older runs)


class RunDir:
    """Paths and stage markers of one run directory (a local or shared POSIX path)."""

    def __init__(self, root: str | os.PathLike) -> None:
        # Absolute: Ray Train's storage path must be a URI or an absolute path, and actors and
        # finetune workers need not share the driver's working directory.
        self.root = Path(root).expanduser().absolute()

    # -- paths -------------------------------------------------------------------------------------

    def iteration_dir(self, iteration: int) -> Path:
        return self.root / f"iter_{iteration}"

    def debate_dir(self, iteration: int, split: str) -> Path:
        return self.iteration_dir(iteration) / f"debate_{split}"

    def metrics_path(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "metrics.json"

    def diversity_path(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "diversity.json"

    def reused_path(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "reused.json"

    def rationalizations_path(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "star_rationalizations.jsonl"

    def datasets_dir(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "datasets"

    def dataset_path(self, iteration: int, unit: str) -> Path:
        """The finetuning set of train unit ``unit`` (``generator_0``, ``single_agent``, ...)."""
        return self.datasets_dir(iteration) / f"{unit}.jsonl"

    def datasets_marker(self, iteration: int) -> Path:
        return self.datasets_dir(iteration) / "counts.json"

    def agent_dir(self, iteration: int, member: str) -> Path:
        return self.iteration_dir(iteration) / member

    def ray_train_dir(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "ray_train"

    def finetunes_path(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "finetunes.json"

    def society_path(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "society.json"

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def summary_path(self) -> Path:
        return self.root / "metrics.json"

    @property
    def report_path(self) -> Path:
        return self.root / "results.md"

    @property
    def plot_path(self) -> Path:
        return self.root / "accuracy.png"

    @property
    def base_model_path(self) -> Path:
        return self.root / "base_model.txt"

    def iterations_on_disk(self) -> list[int]:
        """Iterations with an ``iter_<l>`` directory, ascending."""
        found = []
        for p in self.root.glob("iter_*"):
            suffix = p.name[len("iter_"):]
            if p.is_dir() and suffix.isdigit():
                found.append(int(suffix))
        return sorted(found)

    # -- stage markers: "is this stage done?" --------------------------------------------------------

    def debate_complete(self, iteration: int, split: str, problem_ids: Sequence[str], shard_size: int,
                        settings: dict[str, Any] | None = None) -> bool:
        """Every shard of the debate of ``problem_ids`` is written whole (``records.shard_is_complete``)."""
        out = self.debate_dir(iteration, split)
        return all(shard_is_complete(out, k, list(shard), settings)
                   for k, shard in enumerate(split_shards(list(problem_ids), shard_size)))

    def read_datasets(self, iteration: int) -> dict[str, Any] | None:
        """The sealed ``counts.json`` of iteration ``iteration``'s sets; None (stage to redo) when it is
        missing, or when a set it seals was truncated or changed."""
        return read_sealed_json(self.datasets_marker(iteration))

    def seal_datasets(self, iteration: int, counts: dict[str, Any]) -> None:
        """Write ``counts.json`` sealing every set written so far: the last write of the stage."""
        write_sealed_json(counts, self.datasets_marker(iteration), sorted(self.datasets_dir(iteration).glob("*.jsonl")))

    def read_finetunes(self, iteration: int) -> dict[str, Any] | None:
        """The finetunes' metrics once society ``iteration`` is built whole; None when the stage must run
        (an unreadable ``finetunes.json`` too: its whole checkpoints are then skipped, not retrained)."""
        if self.read_society(iteration) is None:
            return None
        return read_json_checked(self.finetunes_path(iteration))

    def read_diversity(self, iteration: int) -> dict[str, Any] | None:
        """The saved diversity figures of iteration ``iteration`` with their settings, or None."""
        saved = read_json_checked(self.diversity_path(iteration))
        return saved if isinstance(saved, dict) else None

    def read_summary(self) -> dict[str, Any] | None:
        """<run_dir>/metrics.json, or None if there is none (or, logged, if it is unreadable: rewritten)."""
        saved = read_json_checked(self.summary_path, repair=False)
        return saved if isinstance(saved, dict) else None

    def read_society(self, iteration: int, repair: bool = True) -> dict[str, str] | None:
        """Member name -> weights of society ``iteration``; None if that society is not built yet.

        Also None (with a warning) when ``society.json`` does not parse, or when a checkpoint it names
        inside this run directory is not whole (``mft_ray.training.export.checkpoint_problem``): the
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

    # -- the saved config ----------------------------------------------------------------------------

    def saved_config(self) -> dict[str, Any] | None:
        """``config.yaml`` as written (not validated: its model may be gone); None if there is none."""
        if not self.config_path.is_file():
            return None
        try:
            loaded = yaml.safe_load(self.config_path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"{self.config_path}: unreadable saved config ({exc}); fix or remove it") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{self.config_path}: the saved config is not a mapping; fix or remove it")
        return loaded or {}

    def saved_method(self) -> str | None:
        """The method the saved config ran; None without a saved config."""
        saved = self.saved_config()
        return None if saved is None else str(saved.get("method", DEFAULT_METHOD))

    def check_method(self, method: str) -> None:
        """Refuse a run directory made for another method: its finished stages would be reused as this one's."""
        previous = self.saved_method()
        if previous is not None and previous != method:
            raise ConfigError(f"run_dir {str(self.root)!r} holds a run of method {previous!r}, not {method!r}; "
                              "use another run_dir")

    def check_base_model(self, model: str) -> None:
        """Refuse a run directory started from another base model: its finished stages would be reused as
        this model's results. A rebuilt built-in model (a new testbed recipe) resolves to a new directory,
        so rerunning ``make demo`` after an upgrade fails here instead of reprinting the old table."""
        previous = self.saved_base_model()
        if previous and previous != model:
            raise ConfigError(f"run_dir {str(self.root)!r} was started from base model {previous!r}, not "
                              f"{model!r}; its finished stages would be reused: use another run_dir or remove it")

    def record_base_model(self, model: str) -> None:
        """Write what ``check_base_model`` compares against (after ``prepare``; once, so a resume rewrites
        nothing it finished)."""
        if self.saved_base_model() != model:
            write_text_atomic(model + "\n", self.base_model_path)

    def saved_base_model(self) -> str:
        """The base model the run recorded (``record_base_model``); empty when none."""
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
        write_text_atomic(dump_config(config), self.config_path)

