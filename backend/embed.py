"""The embed ensemble's engine step: batched `input_ids` (INT64 [b, n], from the CPU
tokenizer step) in, FP32 `embedding` [b, D] out (see pooling_model.py for batching and
per-request errors)."""

from __future__ import annotations

import numpy as np
from tritonforge.backend.pooling_model import PoolingTritonModel


class TritonPythonModel(PoolingTritonModel):
    OUTPUT = "embedding"

    def run(self, token_ids: list[list[int]],
            token_type_ids: list[list[int]] | None) -> np.ndarray:
        # [N, D] float32; the embed ensemble sends no type ids (its config has no such input)
        return self.llm.pooler.embed_token_ids(token_ids).numpy()
