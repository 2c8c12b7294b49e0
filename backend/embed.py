"""The embedding model: batched `text_input` (BYTES [b, 1]) in, FP32 `embedding` [b, D]
out (see pooling_model.py for batching and per-request errors)."""

from __future__ import annotations

import numpy as np
from tritonforge.backend.pooling_model import PoolingTritonModel


class TritonPythonModel(PoolingTritonModel):
    OUTPUT = "embedding"

    def run(self, texts: list[str]) -> np.ndarray:
        # [N, D] float32
        return self.llm.embed_tensors(texts).float().cpu().numpy()
