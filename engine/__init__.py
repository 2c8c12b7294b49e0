"""The engine: paged KV cache, continuous batching, sampling, and the APIs over them.

`LLM` is the offline API (generate / chat / embed); `AsyncEngine` drives an `LLMEngine`
from its own thread for streaming callers such as the Triton backend. The engine imports
models, never the backend.
"""

if __name__ != "tritonforge.engine":  # a bare `engine`: tritonforge/shadowing.py
    from tritonforge.shadowing import defer_to_installed

    defer_to_installed(__name__, __file__)
else:
    from tritonforge.engine.async_engine import AsyncEngine, RequestStream
    from tritonforge.engine.config import EngineConfig
    from tritonforge.engine.llm import LLM
    from tritonforge.engine.llm_engine import LLMEngine
    from tritonforge.engine.outputs import (
        ClassificationOutput,
        ClassificationRequestOutput,
        CompletionOutput,
        EmbeddingOutput,
        EmbeddingRequestOutput,
        PoolingOutput,
        PoolingRequestOutput,
        RequestOutput,
        ScoringOutput,
        ScoringRequestOutput,
    )
    from tritonforge.engine.pooling_params import PoolingParams
    from tritonforge.engine.sampling_params import SamplingParams

    __all__ = [
        "LLM",
        "AsyncEngine",
        "ClassificationOutput",
        "ClassificationRequestOutput",
        "CompletionOutput",
        "EmbeddingOutput",
        "EmbeddingRequestOutput",
        "EngineConfig",
        "LLMEngine",
        "PoolingOutput",
        "PoolingParams",
        "PoolingRequestOutput",
        "RequestOutput",
        "RequestStream",
        "SamplingParams",
        "ScoringOutput",
        "ScoringRequestOutput",
    ]
