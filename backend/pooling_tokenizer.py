"""The embed / classify ensembles' CPU step: batched `text_input` checked, `text` out.

It fails a bad request on a CPU instance, before the engine step's batch forms: not BYTES,
more bytes than max_model_len tokens can hold (checked before decoding, so a 10 MB text
costs nothing), not UTF-8. The others pass on unchanged as `text` (BYTES [b, 1]).
The engine step tokenizes: the pooling runner owns what tokenizing means for a pooling
model (sentence-transformers' do_lower_case, the max_seq_length limit, truncation), and it
takes text only; the token-count check is therefore the engine step's, per request too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from tritonforge.backend.engine_settings import load_settings, model_max_len
from tritonforge.backend.triton_io import (
    check_text_size,
    input_texts,
    max_input_bytes,
    respond_each,
)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = load_settings(args).engine_config("cpu").resolved()
        self.max_model_len = model_max_len(config)
        self.max_bytes = max_input_bytes(self.max_model_len)

    def execute(self, requests: list[Any]) -> list[Any]:
        return respond_each(requests, self._check, "check a pooling request")

    def _check(self, request: Any) -> Any:
        check_text_size(request, "text_input", self.max_bytes, self.max_model_len)
        texts = input_texts(request, "text_input")  # [b] str; raises on bad UTF-8
        # An empty text is valid here, as in sentence-transformers: its special tokens pool.
        rows = np.array([[t.encode("utf-8")] for t in texts], dtype=np.object_)  # [b, 1]
        return pb_utils.InferenceResponse([pb_utils.Tensor("text", rows)])

    def finalize(self) -> None:
        pass
