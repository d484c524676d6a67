"""Inference engines behind one small interface: a batch of conversations in, one text per conversation out."""

from mft_ray.engines.base import (Conversation, Engine, EngineError, SamplingParams, ScoringNotSupported,
                                  make_engine)

__all__ = ["Conversation", "Engine", "EngineError", "SamplingParams", "ScoringNotSupported", "make_engine"]
