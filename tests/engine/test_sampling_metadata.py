"""The uniform-temperature fast path builds the same SamplingMetadata as the general build,
field by field, so the sampler draws the same tokens; and only plain requests take it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tritonforge.engine.sampler import Sampler, SamplingMetadata
from tritonforge.engine.sampling_metadata import (
    GREEDY,
    UniformSamplingMetadata,
    plain_temperature,
)
from tritonforge.engine.sampling_params import SamplingParams

VOCAB = 97


def _general(params: list[SamplingParams]) -> SamplingMetadata:
    n = len(params)
    return SamplingMetadata.build(params, [[1, 2]] * n, [[3]] * n, [None] * n, {VOCAB - 1},
                                  VOCAB, "cpu")


def _fields_equal(a: SamplingMetadata, b: SamplingMetadata) -> None:
    for field in dataclasses.fields(SamplingMetadata):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor), field.name
            assert x.dtype == y.dtype and torch.equal(x, y), field.name
        else:
            assert x == y, field.name


@pytest.mark.parametrize("temperature", [0.0, 0.6, 1.0, 1.7])
def test_uniform_metadata_equals_the_general_build_at_every_batch_size(temperature):
    uniform = UniformSamplingMetadata("cpu")
    for num_rows in (1, 3, 64, 5, 300, 2):  # the cache grows, then serves smaller batches
        params = [SamplingParams(temperature=temperature, max_tokens=8)] * num_rows
        value = plain_temperature(params[0])
        assert value == (GREEDY if temperature == 0.0 else temperature)
        _fields_equal(uniform.build(num_rows, value, VOCAB), _general(params))


def test_uniform_metadata_draws_the_same_tokens_as_the_general_build():
    logits = torch.randn(40, VOCAB, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0.6, max_tokens=8)] * 40
    fast = Sampler(seed=3)(logits, UniformSamplingMetadata("cpu").build(40, 0.6, VOCAB))
    slow = Sampler(seed=3)(logits, _general(params))
    assert fast.token_ids == slow.token_ids
    assert fast.sampled_logprobs == slow.sampled_logprobs
    assert len(set(fast.token_ids)) > 5  # really sampled, not argmax


@pytest.mark.parametrize("knob", [
    {"top_k": 5}, {"top_p": 0.9}, {"min_p": 0.1}, {"min_tokens": 2}, {"seed": 7},
    {"logprobs": 2}, {"repetition_penalty": 1.1}, {"presence_penalty": 0.5},
    {"frequency_penalty": 0.5},
])
def test_any_knob_besides_temperature_takes_the_general_build(knob):
    assert plain_temperature(SamplingParams(temperature=0.6, **knob)) is None
    assert plain_temperature(SamplingParams(temperature=0.6)) == 0.6
