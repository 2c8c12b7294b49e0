"""The engine: the offline API (`LLM`) and the runners behind it.

Design: `LLM` is the one entry point for offline use and for the Triton backend. This slice
ships the pooling runner (tokenize -> length-sorted batches under a token budget -> model ->
pool -> Matryoshka/normalize); the paged-KV generate runner (scheduler, block manager,
sampler, detokenizer) lands with its own issue behind the same `LLM`. The engine imports
models, never the backend.
"""

from tritonforge.engine.llm import LLM
from tritonforge.engine.outputs import EmbeddingOutput, EmbeddingRequestOutput
from tritonforge.engine.pooling_params import PoolingParams

__all__ = ["LLM", "EmbeddingOutput", "EmbeddingRequestOutput", "PoolingParams"]
