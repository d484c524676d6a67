"""A lane (mft_ray.training.loop.train_lane_per_worker) trains its finetunes in order and skips those already
exported: what a Ray Train restart of the lane's worker group relies on. The finetunes themselves are
recorded, not trained, here; tests/integration/test_faults.py and test_iterate.py kill real lanes."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from mft_ray.training import loop
from mft_ray.training.export import METRICS_NAME, write_manifest


def test_a_restarted_lane_skips_the_finetunes_it_exported(tmp_path, monkeypatch):
    outputs = {name: tmp_path / name for name in ("critic_0", "generator_1", "critic_1")}
    done = outputs["critic_0"]
    done.mkdir()
    (done / "config.json").write_text("{}")
    save_file({"w": torch.zeros(4)}, str(done / "model.safetensors"))
    (done / METRICS_NAME).write_text("{}")
    write_manifest(done)
    trained = []
    monkeypatch.setattr(loop, "train_loop_per_worker", lambda config: trained.append(config["name"]))
    loop.train_lane_per_worker({"jobs": [{"name": n, "output_dir": str(p)} for n, p in outputs.items()]})
    assert trained == ["generator_1", "critic_1"]
    # A half-written export is no finished finetune: it trains again.
    weights = done / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    trained.clear()
    loop.train_lane_per_worker({"jobs": [{"name": n, "output_dir": str(p)} for n, p in outputs.items()]})
    assert trained == ["critic_0", "generator_1", "critic_1"]
