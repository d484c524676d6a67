"""Layout of a run directory. Every stage writes here, so a job can resume and a person can inspect.

    <run_dir>/config.yaml                       resolved config of the latest launch
    <run_dir>/iter_<l>/debate_<split>/shard_*.parquet   debate records
    <run_dir>/iter_<l>/metrics.json             evaluation of iteration l (Algorithm 2)
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from mft_ray.config import Config, ConfigError, dump_config


class RunDir:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()

    def iteration_dir(self, iteration: int) -> Path:
        return self.root / f"iter_{iteration}"

    def debate_dir(self, iteration: int, split: str) -> Path:
        return self.iteration_dir(iteration) / f"debate_{split}"

    def metrics_path(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "metrics.json"

    def prepare(self, config: Config) -> None:
        """Create the directory (refusing an unwritable one clearly) and save the config."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{uuid.uuid4().hex}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"run_dir {str(self.root)!r} is not writable: {exc.strerror or exc}") from exc
        tmp = self.root / f".config.yaml.{uuid.uuid4().hex}.tmp"
        tmp.write_text(dump_config(config))
        os.replace(tmp, self.root / "config.yaml")
