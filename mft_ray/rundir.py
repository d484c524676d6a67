"""Layout of a run directory. Every stage writes here, so a job can resume and a person can inspect.

    <run_dir>/config.yaml                       resolved config of the latest launch
    <run_dir>/iter_<l>/debate_<split>/shard_*.parquet   debate records
    <run_dir>/iter_<l>/metrics.json             evaluation of iteration l (Algorithm 2)
    <run_dir>/iter_<l>/datasets/<role>_<n>.jsonl  finetuning sets built from iteration l-1's debate
    <run_dir>/iter_<l>/datasets/counts.json     set sizes (written last: marks the stage done)
    <run_dir>/iter_<l>/<role>_<n>/              finetuned Hugging Face checkpoints
    <run_dir>/iter_<l>/society.json             which weights each member of society l uses
    <run_dir>/metrics.json                      every iteration's metrics and dataset sizes
    <run_dir>/results.md, accuracy.png          the results table and plot (jobs.iterate, at the end)
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from mft_ray.config import Config, ConfigError, dump_config
from mft_ray.records import write_text_atomic


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

    def read_society(self, iteration: int) -> dict[str, str] | None:
        """Member name -> weights of society ``iteration`` (None if that society is not built yet)."""
        path = self.society_path(iteration)
        return json.loads(path.read_text()) if path.is_file() else None

    @property
    def summary_path(self) -> Path:
        return self.root / "metrics.json"

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
