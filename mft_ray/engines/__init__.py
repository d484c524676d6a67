"""Inference engines behind one small interface: a batch of conversations in, one text per conversation out.

This package's top level holds the types every layer passes around (light: no torch). ``make_engine``
(``mft_ray.engines.factory``) builds the engine a ``ModelConfig`` names for an already resolved path (a local
checkpoint directory or a hub id; ``mft_ray.models.builtin.resolve_model_path`` turns ``builtin:`` names
into directories first).
"""

from __future__ import annotations

from mft_ray.engines.base import Conversation, Engine, SamplingParams
from mft_ray.errors import EngineError, ScoringNotSupported

__all__ = ["Conversation", "Engine", "EngineError", "SamplingParams", "ScoringNotSupported"]
