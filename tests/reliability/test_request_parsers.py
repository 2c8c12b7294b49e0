"""The parsers every request goes through answer ANY input with a value or a per-request
error naming the field (ValueError / RequestError), never another exception: a crash in a
parser would fail the whole batch of a Triton execute() instead of one request.

Property-based (hypothesis) over arbitrary JSON documents, bytes and texts."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonforge.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from tritonforge.engine.structured_outputs import GUIDED_FIELDS
from tritonforge.generator.tritonserver import locate_tritonserver

FIELDS = [f for f in SamplingParams.__dataclass_fields__]
_json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
    st.text(max_size=12),
    # vllm_backend clients send numbers and flags as strings; the edge cases of that path.
    st.sampled_from(["0", "-1", "1e3", "0.5", " 7 ", "+3", "true", "FALSE", "nan", "inf",
                     "1" * 19, "0x10", "", "1_000"]),
)
json_values = st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=6)
sampling_objects = st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=10)),
                                   json_values, max_size=5)


@pytest.fixture(scope="module")
def triton_io() -> ModuleType:
    """backend/triton_io.py imported with the REAL triton_python_backend_utils module of
    the Python backend we serve with (pure Python; the stub's C++ half is not needed by
    the text parsers), under a private name; sys.modules is restored afterwards."""
    install = locate_tritonserver()
    utils_path = Path(install.backend_dir) / "python" / "triton_python_backend_utils.py"
    assert utils_path.exists(), f"no triton_python_backend_utils.py in {install.backend_dir}"
    utils_spec = importlib.util.spec_from_file_location("triton_python_backend_utils",
                                                        utils_path)
    utils = importlib.util.module_from_spec(utils_spec)
    utils_spec.loader.exec_module(utils)
    package = importlib.util.find_spec("tritonforge.backend")
    path = Path(next(iter(package.submodule_search_locations))) / "triton_io.py"
    with mock.patch.dict(sys.modules, {"triton_python_backend_utils": utils}):
        spec = importlib.util.spec_from_file_location("_reliability_triton_io", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def _assert_valid(p: SamplingParams) -> None:
    assert p.n == 1 and p.temperature >= 0 and 0 < p.top_p <= 1 and p.top_k >= 0
    assert 0 <= p.min_p <= 1 and p.repetition_penalty > 0
    assert -2 <= p.presence_penalty <= 2 and -2 <= p.frequency_penalty <= 2
    assert all(isinstance(s, str) and s for s in p.stop)
    assert all(type(t) is int and t >= 0 for t in p.stop_token_ids)
    assert p.max_tokens is None or (type(p.max_tokens) is int and p.max_tokens >= 1)
    assert p.logprobs is None or 0 <= p.logprobs <= MAX_LOGPROBS
    assert p.seed is None or 0 <= p.seed < 2**64


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sampling_objects)
def test_sampling_parameters_json_is_valid_params_or_an_error_naming_a_sent_key(data):
    text = json.dumps(data)
    try:
        params = SamplingParams.from_json(text.encode())
    except ValueError as err:
        message = str(err)
        # The message names one of the keys the client sent (shortened past 77 chars).
        assert any(json.dumps(k)[1:-1][:60] in message or repr(k)[:60] in message
                   for k in data), message
        assert len(message) < 2000  # a 10 MB value is never echoed whole
    else:
        _assert_valid(params)
        sent = {k for k in data}
        # Nothing the client did not send changes from vLLM's defaults.
        defaults = SamplingParams()
        for name in set(FIELDS) - sent:
            if name == "structured_outputs" and sent & set(GUIDED_FIELDS):
                continue  # vLLM's older guided_* names are moved into it
            assert getattr(params, name) == getattr(defaults, name), name


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode),
                 json_values.map(lambda v: json.dumps(v).encode())))
def test_sampling_parameters_any_bytes_are_params_or_value_error(raw):
    try:
        params = SamplingParams.from_json(raw)
    except ValueError as err:
        assert "sampling_parameters" in str(err) or any(f in str(err) for f in FIELDS)
    else:
        _assert_valid(params)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=64), st.text(max_size=64),
                 st.text(max_size=32).map(lambda t: t.encode("utf-8", "surrogatepass")),
                 st.integers(), st.none(), st.floats(), st.lists(st.binary(max_size=4))))
def test_decode_text_gives_the_text_or_an_error_naming_the_input(triton_io, value):
    try:
        text = triton_io.decode_text(value, "text_input")
    except triton_io.RequestError as err:
        assert "'text_input'" in str(err)
        assert isinstance(err, ValueError)  # the backends treat it as a per-request error
        if isinstance(value, bytes):
            with pytest.raises(UnicodeDecodeError):
                value.decode("utf-8")
    else:
        assert isinstance(text, str)
        assert text == (value if isinstance(value, str) else value.decode("utf-8"))


def test_decode_text_on_a_10_mb_invalid_tail_reports_the_byte_not_the_text(triton_io):
    raw = b"a" * 10_000_000 + b"\xff"
    with pytest.raises(triton_io.RequestError) as info:
        triton_io.decode_text(raw, "text_input")
    assert "byte 10000000" in str(info.value) and len(str(info.value)) < 200
