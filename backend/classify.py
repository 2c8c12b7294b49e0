"""The classify ensemble's engine step: batched `input_ids` (INT64 [b, n], from the CPU
tokenizer step) in, FP32 `probabilities` [b, num_labels] out.

Text pairs (a reranker's query and document): the CPU step tokenizes them as one input and
sends their `token_type_ids` beside the ids; rows without a pair get all-0 type ids, so
pairs and single texts share batches. Batching and per-request errors as in
pooling_model.py. The output's `label_filename`
(labels.txt, the model's id2label in id order) lets Triton's classification extension
answer `class_count` requests with "score:index:label" strings; a client that asks for no
class_count gets the raw probabilities.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from tritonforge.backend.pooling_model import PoolingTritonModel


class TritonPythonModel(PoolingTritonModel):
    OUTPUT = "probabilities"

    def initialize(self, args: dict[str, Any]) -> None:
        super().initialize(args)
        num_labels = self.llm.pooler.num_labels
        if num_labels is None:
            raise ValueError(
                f"model {self.llm.config.model!r} is not a sequence classifier (it loads for "
                f"the {self.llm.pooler.task!r} task); render it with the embed template instead"
            )
        # The config's dims and labels.txt were rendered from the model's id2label; a
        # mismatch would make class_count name the wrong labels, so refuse to load.
        config = json.loads(args["model_config"])
        dims = next(list(o["dims"]) for o in config["output"] if o["name"] == self.OUTPUT)
        if [int(d) for d in dims] != [num_labels]:
            raise ValueError(
                f"output '{self.OUTPUT}' has dims {dims} in config.pbtxt but the model has "
                f"{num_labels} labels; re-render the model folder"
            )

    def run(self, token_ids: list[list[int]],
            token_type_ids: list[list[int]] | None) -> np.ndarray:
        # [N, num_labels] float32; type ids mark the two texts of a pair (a reranker's
        # query and document)
        return self.llm.pooler.classify_token_ids(token_ids,
                                                  token_type_ids=token_type_ids).numpy()
