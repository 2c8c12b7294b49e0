"""The serving benchmark's in-process clients, and the server's own counters.

- TritonGrpcClient: vllm_backend-style streaming requests through the public model name
  (text_input, stream=true, exclude_input_in_output=true, return_num_output_tokens,
  sampling_parameters JSON {temperature, max_tokens, ignore_eos}), spread round-robin over
  `num_streams` bidirectional gRPC streams (one channel each). A response's tokens are its
  num_output_tokens.
- EngineClient: the same requests on tritonforge's AsyncEngine directly; its output
  callback gives the timestamps and each step's new token ids.
- server_metrics / wait_idle: Triton's Prometheus endpoint (vllm:* families), to count the
  tokens the server generated and to wait until no request runs before the next level.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from typing import Any

from benchmarks.serving_loop import Client, EventFn
from benchmarks.serving_requests import Request


class TritonGrpcClient(Client):
    name = "triton-grpc"

    def __init__(self, url: str, model: str, num_streams: int) -> None:
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.model = model
        self._handlers: dict[str, EventFn] = {}
        self._lock = threading.Lock()
        self._next = 0
        # Responses for a request already ended (its final seen, or failed by a stream
        # error): counted, never a KeyError in tritonclient's callback thread.
        self.orphan_responses = 0
        self.clients = [grpcclient.InferenceServerClient(url) for _ in range(num_streams)]
        for c in self.clients:
            c.start_stream(callback=self._on_response)

    def _tensor(self, name: str, value: Any, datatype: str) -> Any:
        import numpy as np

        t = self._grpc.InferInput(name, [1], datatype)
        t.set_data_from_numpy(np.array([value], dtype=np.object_ if datatype == "BYTES"
                                       else np.bool_))
        return t

    def send(self, request_id: str, request: Request, temperature: float,
             on_event: EventFn) -> None:
        params = {"temperature": temperature, "max_tokens": request.max_tokens,
                  "ignore_eos": True}
        inputs = [self._tensor("text_input", request.text.encode(), "BYTES"),
                  self._tensor("stream", True, "BOOL"),
                  self._tensor("exclude_input_in_output", True, "BOOL"),
                  self._tensor("return_num_output_tokens", True, "BOOL"),
                  self._tensor("sampling_parameters", json.dumps(params).encode(), "BYTES")]
        with self._lock:
            self._handlers[request_id] = on_event
            client = self.clients[self._next % len(self.clients)]
            self._next += 1
        client.async_stream_infer(self.model, inputs, request_id=request_id,
                                  enable_empty_final_response=True)

    def _on_response(self, result: Any, error: Any) -> None:
        t = time.perf_counter()
        if error is not None:
            # A stream error carries no request id: fail every request in flight, so the
            # driver never waits on a response that will not come.
            with self._lock:
                handlers, self._handlers = self._handlers, {}
            for on_event in handlers.values():
                on_event(t, 0, True, str(error))
            return
        response = result.get_response()
        final = response.parameters["triton_final_response"].bool_param
        tokens = 0
        if any(o.name == "num_output_tokens" for o in response.outputs):
            tokens = int(result.as_numpy("num_output_tokens").reshape(-1)[0])
        elif any(o.name == "text_output" for o in response.outputs):
            text = result.as_numpy("text_output").reshape(-1)[0]
            tokens = 1 if text else 0  # the interface without counts: one token a response
        with self._lock:
            on_event = self._handlers.pop(response.id, None) if final else \
                self._handlers.get(response.id)
            if on_event is None:
                self.orphan_responses += 1
        if on_event is not None:
            on_event(t, tokens, final, None)

    def close(self, cancel: bool = False) -> None:
        """Closes the streams; without `cancel` each waits for its requests to end."""
        for c in self.clients:
            c.stop_stream(cancel_requests=cancel)
            c.close()


class EngineClient(Client):
    name = "engine"

    def __init__(self, engine: Any) -> None:
        from tritonforge.engine import SamplingParams

        self.engine = engine
        self._params = SamplingParams

    def send(self, request_id: str, request: Request, temperature: float,
             on_event: EventFn) -> None:
        params = self._params(temperature=temperature, max_tokens=request.max_tokens,
                              ignore_eos=True)

        def callback(output: Any, error: BaseException | None) -> None:
            t = time.perf_counter()
            if error is not None:
                on_event(t, 0, True, f"{type(error).__name__}: {error}")
                return
            on_event(t, len(output.outputs[0].token_ids_delta), bool(output.finished), None)

        self.engine.add_request(request_id, request.text, params, callback=callback)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def close(self) -> None:
        self.engine.shutdown()


def server_metrics(url: str, timeout: float = 5.0) -> dict[str, float]:
    """Triton's /metrics as {family: value summed over its label sets} (counters and
    gauges; histogram series keep their _sum/_count/_bucket names)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            values[name] = values.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return values


def wait_idle(url: str, timeout: float) -> tuple[bool, float]:
    """Waits until the server reports no running or waiting request; (idle?, seconds)."""
    t0 = time.perf_counter()
    while True:
        try:
            m = server_metrics(url)
            busy = m.get("vllm:num_requests_running", 0.0) + m.get("vllm:num_requests_waiting",
                                                                   0.0)
        except OSError:
            busy = 1.0
        if busy == 0:
            return True, time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            return False, time.perf_counter() - t0
        time.sleep(0.25)
