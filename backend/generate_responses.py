"""The generate ensemble's last step: passes the engine step's responses to the client and
turns a client's cancellation into an abort in the engine core.

Why a step of its own: Triton's ensemble scheduler tells a step that the client cancelled
only when it schedules that step (core's EnsembleContext::ScheduleSteps cancels the next
step's request), never the engine step that is already streaming. Every engine response is
a new request to this step, so the cancellation is seen here within one response: this step
aborts the engine request through the core's socket (its `request_ref`, which names the core
and the request) and the engine step then ends the stream, freeing its KV blocks. Requests
that produce no tokens for a while (queued, non-streaming) send keepalive responses, which
carry only `request_ref`: this step swallows them unless they carry a cancellation.

Decoupled, so a keepalive gets no response at all (only the FINAL flag); a data response
goes out as it came, with the FINAL flag that ends this step's request.
"""

from __future__ import annotations

import json
from typing import Any

import triton_python_backend_utils as pb_utils
from tritonforge.backend.triton_io import log_exception
from tritonforge.engine.core_client import CoreAborter

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# The engine step's outputs this step forwards (the ensemble's public outputs).
FORWARDED = ("text_output", "finish_reason", "cumulative_logprob", "logprobs",
             "num_input_tokens", "num_output_tokens")


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise ValueError("the generate responses step must be decoupled: set "
                             "model_transaction_policy { decoupled: true }")
        self.aborter = CoreAborter()

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._forward(request, sender)
            except Exception:  # noqa: BLE001 - one response must not fail the others
                log_exception("could not forward a generate response")
                sender.send(flags=FINAL)
        return None

    def _forward(self, request: Any, sender: Any) -> None:
        if request.is_cancelled():
            ref = pb_utils.get_input_tensor_by_name(request, "request_ref")
            if ref is not None:
                value = ref.as_numpy().reshape(-1)[0]
                self.aborter.abort(value.decode("utf-8") if isinstance(value, bytes)
                                   else str(value))
            sender.send(flags=FINAL)  # the client is gone: nothing to forward
            return
        tensors = [pb_utils.Tensor(name, tensor.as_numpy()) for name in FORWARDED
                   if (tensor := pb_utils.get_input_tensor_by_name(request, name)) is not None]
        if not tensors:  # a keepalive
            sender.send(flags=FINAL)
            return
        sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL)

    def finalize(self) -> None:
        self.aborter.close()
