"""SamplingParams: vLLM's names and defaults; every bad value or type is a ValueError that
names its field; the JSON parser answers anything with a valid object or a ValueError."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonforge.engine.sampling_params import MAX_LOGPROBS, SamplingParams

FIELDS = [f.name for f in dataclasses.fields(SamplingParams)]


def test_defaults_are_vllms():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (1, 1.0, 1.0, 0, 0.0, None)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.stop, p.stop_token_ids, p.ignore_eos) == ([], [], False)
    assert (p.max_tokens, p.min_tokens, p.logprobs) == (16, 0, None)
    assert p.skip_special_tokens and p.spaces_between_special_tokens
    assert not p.include_stop_str_in_output
    assert MAX_LOGPROBS == 20


BAD_VALUES = [
    ("n", 129), ("n", 0), ("n", True), ("n", 1.0),
    ("temperature", -0.1), ("temperature", "0.5"), ("temperature", True),
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", None),
    ("temperature", 10**400),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -1), ("top_p", "1"), ("top_p", math.nan),
    ("top_k", -2), ("top_k", 1.5), ("top_k", "5"), ("top_k", True), ("top_k", None),
    ("min_p", -0.01), ("min_p", 1.5), ("min_p", [0.1]),
    ("seed", -1), ("seed", 2**64), ("seed", 1.0), ("seed", "42"), ("seed", False),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", "2"),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01), ("presence_penalty", {}),
    ("frequency_penalty", 3), ("frequency_penalty", -3.0), ("frequency_penalty", "0"),
    ("stop", ""), ("stop", [""]), ("stop", {"a": 1}), ("stop", 5), ("stop", ["ok", 5]),
    ("stop", [["nested"]]),
    ("stop_token_ids", [-1]), ("stop_token_ids", 5), ("stop_token_ids", ["1"]),
    ("stop_token_ids", [True]), ("stop_token_ids", "12"),
    ("ignore_eos", 1), ("ignore_eos", "false"), ("ignore_eos", None),
    ("skip_special_tokens", 0), ("spaces_between_special_tokens", "yes"),
    ("include_stop_str_in_output", 1.0),
    ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 1.5), ("max_tokens", "100"),
    ("max_tokens", True),
    ("min_tokens", -1), ("min_tokens", 17), ("min_tokens", 2.0), ("min_tokens", None),
    ("logprobs", -1), ("logprobs", MAX_LOGPROBS + 1), ("logprobs", 2.0), ("logprobs", True),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES, ids=[f"{f}={v!r}" for f, v in BAD_VALUES])
def test_every_bad_value_or_type_names_its_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_n_error_names_the_allowed_range():
    assert SamplingParams(n=128).n == 128
    with pytest.raises(ValueError, match=r"n must be an int in \[1, 128\]"):
        SamplingParams(n=129)


def test_huge_bad_value_is_shown_short():
    with pytest.raises(ValueError) as info:
        SamplingParams(temperature="x" * 10_000_000)
    assert len(str(info.value)) < 300


def test_values_are_normalized():
    p = SamplingParams(stop="###", temperature=0, top_k=-1, stop_token_ids=(3, 4))
    assert p.stop == ["###"] and p.stop_token_ids == [3, 4] and p.top_k == 0
    assert isinstance(p.temperature, float) and p.is_greedy
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(temperature=1e-6).is_greedy and not SamplingParams().is_greedy


def test_range_edges_are_accepted():
    SamplingParams(top_p=1e-9, min_p=1.0, top_k=1, seed=0, presence_penalty=-2.0,
                   frequency_penalty=2, logprobs=0, max_tokens=1, min_tokens=1)
    SamplingParams(seed=2**64 - 1, logprobs=MAX_LOGPROBS, max_tokens=None, min_tokens=10_000)


def test_max_tokens_for_resolves_none_and_rejects_overflow():
    assert SamplingParams(max_tokens=None).max_tokens_for(10, 64) == 54
    assert SamplingParams(max_tokens=54).max_tokens_for(10, 64) == 54
    with pytest.raises(ValueError, match=r"max_tokens.*max_model_len 64"):
        SamplingParams(max_tokens=55).max_tokens_for(10, 64)
    with pytest.raises(ValueError, match="max_model_len 64"):
        SamplingParams(max_tokens=None).max_tokens_for(64, 64)


def test_from_dict_rejects_unknown_keys_listing_allowed():
    with pytest.raises(ValueError) as info:
        SamplingParams.from_dict({"temperature": 0.5, "best_of": 2})
    msg = str(info.value)
    assert "'best_of'" in msg and all(name in msg for name in FIELDS)


def test_from_json_parses_and_names_malformed_json():
    p = SamplingParams.from_json('{"temperature": 0, "stop": "\\n", "max_tokens": 5}')
    assert (p.temperature, p.stop, p.max_tokens) == (0.0, ["\n"], 5)
    assert SamplingParams.from_json(b'{"top_k": 3}').top_k == 3
    for bad in ['{"temperature": 0.5', "", "nope", "{'a': 1}"]:
        with pytest.raises(ValueError, match="sampling_parameters is not valid JSON: "):
            SamplingParams.from_json(bad)
    with pytest.raises(ValueError, match="sampling_parameters must be a JSON object"):
        SamplingParams.from_json("[1, 2]")
    with pytest.raises(ValueError, match="UTF-8"):
        SamplingParams.from_json(b'{"stop": "\xff"}')
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams.from_json('{"temperature": NaN}')
    with pytest.raises(ValueError, match="not valid JSON"):
        SamplingParams.from_json("[" * 100_000)


# --- property-based: the request parser answers anything with an object or a ValueError ---
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-3, max_value=25),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(min_value=-2.5, max_value=2.5),
    st.text(max_size=8),
)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)
_keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=12))


def _assert_valid(p: SamplingParams) -> None:
    assert p.n == 1 and p.temperature >= 0 and 0 < p.top_p <= 1 and p.top_k >= 0
    assert 0 <= p.min_p <= 1 and p.repetition_penalty > 0
    assert all(isinstance(s, str) and s for s in p.stop)
    assert all(isinstance(t, int) and t >= 0 for t in p.stop_token_ids)
    assert p.max_tokens is None or p.max_tokens >= 1
    assert p.logprobs is None or 0 <= p.logprobs <= MAX_LOGPROBS
    # A valid object round-trips through its own constructor unchanged.
    assert SamplingParams(**dataclasses.asdict(p)) == p


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _values, max_size=6))
def test_parser_over_random_dicts_gives_valid_object_or_value_error_naming_a_key(data):
    try:
        p = SamplingParams.from_dict(data)
    except ValueError as e:
        assert any(k in str(e) or repr(k) in str(e) for k in data), str(e)
    else:
        _assert_valid(p)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=40), st.binary(max_size=40),
                 st.dictionaries(_keys, _values, max_size=4).map(json.dumps)))
def test_parser_over_random_json_text_never_raises_anything_but_value_error(text):
    try:
        p = SamplingParams.from_json(text)
    except ValueError:
        pass
    else:
        _assert_valid(p)


def test_vllm_backend_string_numbers_are_accepted_from_json():
    # vllm_backend's sample client sends numbers as strings; its users keep working.
    params = SamplingParams.from_json(
        '{"temperature": "0.1", "top_p": "0.95", "max_tokens": "100", "seed": "7",'
        ' "ignore_eos": "true"}'
    )
    assert (params.temperature, params.top_p, params.max_tokens, params.seed) == (
        0.1, 0.95, 100, 7)
    assert params.ignore_eos is True


@pytest.mark.parametrize("text", ['{"temperature": "hot"}', '{"max_tokens": "1.5"}',
                                  '{"top_k": "1e3"}', '{"ignore_eos": "yes"}'])
def test_string_values_that_are_not_numbers_still_name_the_field(text):
    field = text.split('"')[1]
    with pytest.raises(ValueError, match=field):
        SamplingParams.from_json(text)


@pytest.mark.parametrize("field", ["seed", "temperature", "top_p", "logprobs", "min_tokens"])
def test_an_int_too_large_to_print_is_still_an_error_naming_its_field(field):
    # Past 4300 digits str() and repr() raise; the error must still be this field's.
    with pytest.raises(ValueError, match=f"^{field} must be"):
        SamplingParams.from_dict({field: 10**5000})
    with pytest.raises(ValueError, match="^min_tokens must be"):
        SamplingParams.from_dict({"max_tokens": 10**5000, "min_tokens": -1})
    with pytest.raises(ValueError, match="^max_tokens must be <= 10"):
        SamplingParams.from_dict({"max_tokens": 10**5000}).max_tokens_for(3, 13)
