"""The generate ensemble's last step: passes the engine step's responses to the client and
turns a client's cancellation into an abort in the engine core.

Why a step of its own: Triton's ensemble scheduler tells a step that the client cancelled
only when it schedules that step (core's EnsembleContext::ScheduleSteps cancels the next
step's request), never the engine step that is already streaming. Every engine response is
a new request to this step, so the cancellation is seen here: this step aborts the engine
request through the core's socket (its `request_ref`, which names the core and the request)
and the engine step then ends the stream, freeing its KV blocks. Requests that produce no
tokens for a while (queued, non-streaming) send keepalive responses, which carry only
`request_ref`: this step swallows them unless they carry a cancellation.

Throughput: this step sees every response of every stream, in one instance (ordering, see
its config), so its per-response cost can cap the server. On the H100, perf_analyzer got
0.42x of the engine alone at 16 streams (a response per token) and topped out near 2,200
responses/s at every concurrency while execute() did an is_cancelled() and a send (a round
trip to Triton each) per request in turn: the likely cap, not yet confirmed on a GPU. Now
execute() only reads the inputs and builds the response; a ResponseWriter's threads check
and send, a stream's responses in order on one thread, the round trips of different
streams in parallel (GIL released while they wait). Every response is still checked before
it goes out: a data response sent to a request that is already cancelled leaves that
request in flight for good (its model never unloads; seen with tritonserver 2.51 when
checks were spaced 50 ms apart per stream).

Decoupled, so a keepalive gets no response at all (only the FINAL flag); a data response
goes out as it came, with the FINAL flag that ends this step's request.
"""

from __future__ import annotations

import contextlib
import json
import zlib
from typing import Any

import triton_python_backend_utils as pb_utils
from tritonforge.backend.response_writer import ResponseWriter
from tritonforge.backend.triton_io import log_cancellation, log_exception
from tritonforge.engine.core_client import CoreAborter

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# The engine step's outputs this step forwards (the ensemble's public outputs).
FORWARDED = ("text_output", "finish_reason", "cumulative_logprob", "logprobs",
             "num_input_tokens", "num_output_tokens")
SENDER_THREADS = 4


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise ValueError("the generate responses step must be decoupled: set "
                             "model_transaction_policy { decoupled: true }")
        self.aborter = CoreAborter()
        self.writer = ResponseWriter(self._deliver, log_exception, SENDER_THREADS,
                                     name="tritonforge-responses")

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            try:
                ref = _request_ref(request)
                tensors = [pb_utils.Tensor(name, tensor.as_numpy()) for name in FORWARDED
                           if (tensor := pb_utils.get_input_tensor_by_name(request, name))
                           is not None]
                response = pb_utils.InferenceResponse(output_tensors=tensors) if tensors else None
            except Exception:  # noqa: BLE001 - one response must not fail the others
                log_exception("could not forward a generate response")
                request.get_response_sender().send(flags=FINAL)
                continue
            # Keyed by the stream, so its responses go out in order from one thread.
            self.writer.submit(ref, (request, response), shard=zlib.crc32(ref.encode()))
        return None

    def _deliver(self, ref: str, items: list[tuple[Any, Any]]) -> None:
        """A writer thread: sends a stream's responses in order, each with its own FINAL."""
        for request, response in items:
            sender = request.get_response_sender()
            try:
                if request.is_cancelled():
                    log_cancellation(lambda: self.aborter.abort(ref), ref)
                    sender.send(flags=FINAL)  # the client is gone: nothing to forward
                elif response is None:  # a keepalive
                    sender.send(flags=FINAL)
                else:
                    sender.send(response, flags=FINAL)
            except Exception:  # noqa: BLE001 - the stream's other responses still go out
                log_exception("could not forward a generate response")
                with contextlib.suppress(Exception):  # its FINAL, or it stays in flight
                    sender.send(flags=FINAL)

    def finalize(self) -> None:
        self.writer.close()
        self.aborter.close()


def _request_ref(request: Any) -> str:
    ref = pb_utils.get_input_tensor_by_name(request, "request_ref")
    if ref is None:
        return ""
    value = ref.as_numpy().reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
