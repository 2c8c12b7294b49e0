"""A diagnostic decoupled model with the generate interface: it streams `text_input` back,
one word per response, as `text_output` deltas.

It checks a deployment end to end (server, Python-backend stub, our package in the stub's
environment, decoupled streaming over gRPC and HTTP generate_stream) without loading
weights. Streaming sends one response per delta and puts the FINAL flag on the last data
response; a non-streaming request gets exactly one response.
"""

from __future__ import annotations

import re
from typing import Any

import triton_python_backend_utils as pb_utils
from tritonforge.backend.triton_io import (
    RequestError,
    error_response,
    input_bool,
    input_text,
    text_tensor,
)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def split_deltas(text: str) -> list[str]:
    """Words with their trailing whitespace; "".join(split_deltas(t)) == t."""
    return re.findall(r"\S+\s*|\s+", text) or [""]


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        self.model_name = args["model_name"]

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                text = input_text(request, "text_input")
                stream = input_bool(request, "stream", default=False)
            except RequestError as err:
                sender.send(error_response(err), flags=FINAL)
                continue
            deltas = split_deltas(text) if stream else [text]
            for i, delta in enumerate(deltas):
                if sender.is_cancelled():
                    sender.send(flags=FINAL)
                    break
                response = pb_utils.InferenceResponse([text_tensor("text_output", [delta])])
                sender.send(response, flags=FINAL if i == len(deltas) - 1 else 0)

    def finalize(self) -> None:
        pass
