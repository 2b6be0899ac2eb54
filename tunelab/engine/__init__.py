"""Generation engine: one base model, many PEFT adapters routed by name, batched generation. No HTTP.

Importing this package does not import torch; the torch-backed `Engine` lives in `tunelab.engine.engine`.
The interface the server uses is in `tunelab.engine.types`; a model-free `FakeEngine` is in
`tests/fake_engine.py`.
"""

from tunelab.engine.types import (
    AdapterError,
    EngineError,
    GenerationEvent,
    GenerationRequest,
    GenerationStream,
    InferenceEngine,
    InvalidRequestError,
    ModelInfo,
    ModelNotFoundError,
    SamplingParams,
)

__all__ = [
    "AdapterError",
    "EngineError",
    "GenerationEvent",
    "GenerationRequest",
    "GenerationStream",
    "InferenceEngine",
    "InvalidRequestError",
    "ModelInfo",
    "ModelNotFoundError",
    "SamplingParams",
]
