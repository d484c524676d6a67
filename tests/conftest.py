"""Shared fixtures: a tiny Llama built locally (nothing downloaded) and one Ray start per module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before anything starts Ray: no token auth (it breaks later CLI calls), no usage reporting.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A randomly initialised 2-layer Llama with a byte tokenizer and chat template, saved locally."""
    from mft_ray.models import build_tiny_llama

    return str(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def testbed_mini(tmp_path_factory) -> str:
    """The mini testbed (pretrained ~30 s on arithmetic debate turns): its answers parse and agree."""
    from mft_ray.testbed import MINI_TESTBED, pretrain

    return str(pretrain(tmp_path_factory.mktemp("testbed-mini"), MINI_TESTBED))


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray instance with 2 CPUs, started once per test module."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
