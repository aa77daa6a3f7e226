"""The FFN-skip decode engine: model loading, scheduling, the skip loop, sampling and batching.

This package imports torch and transformers, never grpc, redis or protobuf.
"""

from ffnskip.engine.engine import Engine
from ffnskip.engine.loading import LoadedModel, load_model
from ffnskip.engine.results import GenerationResult, TokenEvent

__all__ = ["Engine", "GenerationResult", "TokenEvent", "LoadedModel", "load_model"]
