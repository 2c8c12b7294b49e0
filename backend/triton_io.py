"""Reading Triton request tensors and model parameters, with per-request errors.

A `RequestError` names the offending field and what is allowed; the backend turns it into
an error response for that request alone, so the other requests of a batch carry on.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


class RequestError(ValueError):
    """A bad request field; the message names the field and the allowed values."""


def model_parameters(args: dict[str, Any]) -> dict[str, str]:
    """The `parameters` map of config.pbtxt as plain strings."""
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def instance_device(args: dict[str, Any]) -> str:
    """'cuda:N' for a KIND_GPU instance (N: the device Triton gave it), 'cpu' for KIND_CPU,
    and 'auto' (the engine picks) for KIND_MODEL."""
    kind = args.get("model_instance_kind")
    if kind == "GPU":
        return f"cuda:{args.get('model_instance_device_id', 0)}"
    return "cpu" if kind == "CPU" else "auto"


def _tensor(request: Any, name: str, required: bool) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        if required:
            raise RequestError(f"input '{name}' is required")
        return None
    return tensor.as_numpy()


def decode_text(value: object, name: str) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, (bytes, bytearray, np.bytes_)):
        raise RequestError(f"input '{name}' must be BYTES (UTF-8 text), got {type(value).__name__}")
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(f"input '{name}' is not valid UTF-8 (byte {err.start})") from None


# A token is rarely longer than 16 bytes of UTF-8, so a text over this many bytes per
# allowed token cannot fit the context; the floor keeps short contexts usable for chat.
MAX_BYTES_PER_TOKEN = 64
MIN_MAX_INPUT_BYTES = 1 << 16


def max_input_bytes(max_model_len: int) -> int:
    """The byte size above which a text cannot fit `max_model_len` tokens: refused before
    it is decoded or tokenized, so a 10 MB text costs no tokenizer time."""
    return max(MIN_MAX_INPUT_BYTES, MAX_BYTES_PER_TOKEN * max_model_len)


def check_text_size(request: Any, name: str, max_bytes: int, max_model_len: int) -> None:
    """Refuses a BYTES input whose strings hold more than `max_bytes` bytes in all."""
    array = _tensor(request, name, required=False)
    if array is None:
        return
    if array.dtype != np.object_:
        raise RequestError(f"input '{name}' must be BYTES (UTF-8 text), got {array.dtype}")
    size = sum(len(v) if isinstance(v, (bytes, str)) else 0 for v in array.reshape(-1))
    if size > max_bytes:
        raise RequestError(
            f"input '{name}' is too long: {size} bytes; at most {max_bytes} bytes can fit "
            f"max_model_len={max_model_len} tokens")


def input_texts(request: Any, name: str, cut_at: int | None = None) -> list[str]:
    """All strings of a BYTES input, flattened in order (a batched [b, 1] input gives b);
    with `cut_at`, each first cut to that many bytes on a character boundary."""
    array = _tensor(request, name, required=True)
    values = array.reshape(-1)
    if cut_at is not None:
        values = [cut_utf8(v, cut_at) if isinstance(v, (bytes, str)) else v for v in values]
    return [decode_text(v, name) for v in values]


def input_text(request: Any, name: str) -> str:
    """The single string of a BYTES [1] input."""
    texts = input_texts(request, name)
    if len(texts) != 1:
        raise RequestError(f"input '{name}' must hold exactly one string, got {len(texts)}")
    return texts[0]


def optional_text(request: Any, name: str) -> str | None:
    """The single string of an optional BYTES [1] input, or None when it was not sent."""
    if pb_utils.get_input_tensor_by_name(request, name) is None:
        return None
    return input_text(request, name)


def input_bool(request: Any, name: str, default: bool) -> bool:
    value = optional_bool(request, name)
    return default if value is None else value


def optional_bool(request: Any, name: str) -> bool | None:
    """The value of an optional BOOL [1] input, or None when it was not sent."""
    array = _tensor(request, name, required=False)
    if array is None:
        return None
    if array.size != 1:
        raise RequestError(f"input '{name}' must hold one BOOL, got {array.size} values")
    return bool(array.reshape(-1)[0])


def optional_ints(request: Any, name: str) -> list[int] | None:
    """The values of an optional integer input (INT32 or INT64; a batched [b, 1] input gives
    b), flattened in order, or None when it was not sent."""
    array = _tensor(request, name, required=False)
    if array is None:
        return None
    if array.dtype.kind not in "iu":
        raise RequestError(f"input '{name}' must be INT32 or INT64, got {array.dtype}")
    return [int(v) for v in array.reshape(-1)]


def cut_utf8(value: bytes | str, max_bytes: int) -> bytes | str:
    """`value` cut to at most `max_bytes` bytes, on a character boundary (BYTES from a
    client are usually bytes; a str is cut by its UTF-8 encoding)."""
    raw = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
    if len(raw) <= max_bytes:
        return value
    end = max_bytes
    while end > 0 and (raw[end] & 0xC0) == 0x80:  # a continuation byte: back to a start
        end -= 1
    cut = raw[:end]
    return cut.decode("utf-8", "surrogatepass") if isinstance(value, str) else cut


def request_parameters(request: Any) -> dict[str, Any]:
    """The request's own `parameters` (gRPC/HTTP request parameters, or the `parameters`
    object of an HTTP generate call) as a dict."""
    text = request.parameters()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply
        raise RequestError("request parameters are not valid JSON") from None
    return value if isinstance(value, dict) else {}


def text_tensor(name: str, texts: list[str]) -> Any:
    return pb_utils.Tensor(name, np.array([t.encode("utf-8") for t in texts], dtype=np.object_))


def error_response(err: Exception | str, code: str | None = None) -> Any:
    """A response carrying only an error; `code` names a pb_utils.TritonError code
    ("CANCELLED", "UNAVAILABLE", ...) where this Python backend has it."""
    code_value = getattr(pb_utils.TritonError, code, None) if code else None
    error = (pb_utils.TritonError(str(err)) if code_value is None
             else pb_utils.TritonError(str(err), code_value))
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def cancelled_response() -> Any:
    """The last response of a cancelled request: error code CANCELLED (Python backends
    older than 23.10 have no codes; they get a plain error that says so)."""
    return error_response("the request was cancelled", "CANCELLED")


def respond_each(requests: list[Any], handle: Callable[[Any], Any], what: str) -> list[Any]:
    """One response per request from `handle(request)`, for non-decoupled models: a
    RequestError fails that request alone (INVALID_ARG); any other exception is logged
    and fails it too, never the batch."""
    responses = []
    for request in requests:
        try:
            responses.append(handle(request))
        except RequestError as err:
            responses.append(error_response(err, "INVALID_ARG"))
        except Exception as err:  # noqa: BLE001 - one request must not fail the batch
            log_exception(f"could not {what}")
            responses.append(error_response(f"could not parse the request: {err}"))
    return responses


def log_exception(message: str) -> None:
    """`message` and the current traceback into Triton's log (pb_utils.Logger, any thread)."""
    pb_utils.Logger.log_error(f"{message}\n{traceback.format_exc()}")


def log_info(message: str) -> None:
    pb_utils.Logger.log_info(message)


# vllm_backend logs these two lines around the engine abort of a cancelled request, and its
# request-cancellation test (and operators' log alerts) look for them: a drop-in logs them too.
CANCELLING_LOG = "[vllm] Cancelling the request"
CANCELLED_LOG = "[vllm] Successfully cancelled the request"


def log_cancellation(abort: Callable[[], Any], request: str) -> None:
    """Runs `abort()` (the engine abort of a request its client cancelled) between
    vllm_backend's two log lines; `request` names it in both."""
    log_info(f"{CANCELLING_LOG} {request}")
    abort()
    log_info(f"{CANCELLED_LOG} {request}")


def log_warning(message: str) -> None:
    pb_utils.Logger.log_warn(message)


def resolve_model_path(value: str, model_dir: str | None) -> str:
    """A model/tokenizer path from config.pbtxt: relative paths may be relative to the
    model's folder in the repository (`generator build --download` writes `weights`), so
    the repository can move as a whole."""
    if model_dir and not Path(value).is_absolute() and (Path(model_dir) / value).exists():
        return str(Path(model_dir) / value)
    return value
