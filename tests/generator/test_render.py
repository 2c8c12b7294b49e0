"""Rendering model folders: strict templates, escaped values, Triton-parsable configs,
validated names, and no half-written output."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.grpc import model_config_pb2
from tritonforge.generator import render
from tritonforge.generator.errors import UserError

EMBED_CONTEXT = {
    "source": "org/model",
    "model_path": "/models/minilm",
    "dtype": "auto",
    "max_model_len": "",
    "max_batch_size": 32,
    "max_queue_delay_us": 1000,
    "instance_count": 2,
    "instance_kind": "KIND_CPU",
}


GENERATE_CONTEXT = {
    "model_path": "/models/llama", "dtype": "bfloat16", "max_model_len": 4096,
    "max_num_seqs": 256, "max_num_batched_tokens": None, "gpu_memory_utilization": 0.9,
    "block_size": 16, "enable_prefix_caching": True, "instance_count": 1,
    "instance_kind": "KIND_GPU",
}
CLASSIFY_CONTEXT = {
    "source": "org/classifier", "model_path": "/models/classifier", "dtype": "auto",
    "max_model_len": "", "max_batch_size": 16, "max_queue_delay_us": 1000,
    "instance_count": 2, "instance_kind": "KIND_CPU", "num_labels": 3,
    "labels": ["negative", "neutral", "positive"],
}
CONTEXTS = {"embed": EMBED_CONTEXT, "generate": GENERATE_CONTEXT, "classify": CLASSIFY_CONTEXT}


def _parse(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("template", render.template_names())
def test_every_template_renders_a_config_triton_parses(tmp_path, template):
    context = CONTEXTS.get(template, {"instance_count": 1})
    folder = render.render_model(template, tmp_path, f"m_{template}", context)
    config = _parse(folder / "config.pbtxt")
    assert config.name == f"m_{template}" and config.backend == "python"
    shim = (folder / "1" / "model.py").read_text()
    assert "from tritonforge.backend." in shim and "TritonPythonModel" in shim


def test_echo_is_decoupled_with_the_generate_tensor_names(tmp_path):
    config = _parse(render.render_model("echo", tmp_path, "e", {"instance_count": 1})
                    / "config.pbtxt")
    assert config.model_transaction_policy.decoupled
    assert [i.name for i in config.input] == ["text_input", "stream"]
    assert [o.name for o in config.output] == ["text_output"]


def test_embed_config_carries_batching_and_parameters(tmp_path):
    config = _parse(render.render_model("embed", tmp_path, "e", EMBED_CONTEXT) / "config.pbtxt")
    assert config.max_batch_size == 32 and config.HasField("dynamic_batching")
    assert config.parameters["model"].string_value == "/models/minilm"
    assert config.instance_group[0].count == 2


@given(st.text(max_size=80))
def test_any_config_value_round_trips_through_pbtxt_without_injection(value):
    config = text_format.Parse(
        f"name: {render.pbtxt_string(value)}", model_config_pb2.ModelConfig()
    )
    assert config.name == value


def test_injected_path_stays_a_string_value(tmp_path):
    evil = '/m"\n} } ] instance_group [ { count: 99 kind: KIND_GPU } ] parameters [ { key: "x'
    folder = render.render_model("embed", tmp_path, "e", {**EMBED_CONTEXT, "model_path": evil,
                                                          "source": "a\nname: \"pwn\""})
    config = _parse(folder / "config.pbtxt")
    assert config.parameters["model"].string_value == evil
    assert config.name == "e" and config.instance_group[0].count == 2


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "x" * 129, "sp ace", ".."])
def test_invalid_model_names_are_refused(tmp_path, name):
    with pytest.raises(UserError, match="invalid model name"):
        render.render_model("echo", tmp_path, name, {"instance_count": 1})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("source", "name"), [
    ("Qwen/Qwen3-0.6B", "Qwen3-0.6B"),
    ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"),
    ("/models/my model!/", "my_model_"),
    ("./.cache/x", "x"),
])
def test_model_names_are_sanitized_from_ids_and_paths(source, name):
    assert render.sanitize_model_name(source) == name


def test_a_missing_template_value_is_an_error_and_leaves_nothing(tmp_path):
    context = dict(EMBED_CONTEXT)
    del context["dtype"]
    with pytest.raises(Exception, match="dtype"):
        render.render_model("embed", tmp_path, "e", context)
    assert list(tmp_path.iterdir()) == []


def test_existing_model_is_not_clobbered_without_force(tmp_path):
    folder = render.render_model("echo", tmp_path, "e", {"instance_count": 1})
    (folder / "marker").write_text("mine")
    with pytest.raises(UserError, match="--force"):
        render.render_model("echo", tmp_path, "e", {"instance_count": 1})
    assert (folder / "marker").read_text() == "mine"
    render.render_model("echo", tmp_path, "e", {"instance_count": 3}, force=True)
    assert not (folder / "marker").exists()
    assert _parse(folder / "config.pbtxt").instance_group[0].count == 3


def test_unknown_template_lists_the_allowed_ones(tmp_path):
    with pytest.raises(UserError, match="allowed: .*echo"):
        render.render_model("nope", tmp_path, "e", {})


def test_generate_is_decoupled_with_the_vllm_backend_interface(tmp_path):
    folder = render.render_model("generate", tmp_path, "g", GENERATE_CONTEXT)
    config = _parse(folder / "config.pbtxt")
    assert config.model_transaction_policy.decoupled and config.max_batch_size == 0
    names = {i.name for i in config.input}
    assert {"text_input", "stream", "sampling_parameters", "exclude_input_in_output",
            "return_finish_reason", "return_cumulative_logprob", "return_logprobs",
            "return_num_input_tokens", "return_num_output_tokens", "messages"} <= names
    assert {o.name for o in config.output} == {
        "text_output", "finish_reason", "cumulative_logprob", "logprobs", "num_input_tokens",
        "num_output_tokens"}
    assert config.parameters["model"].string_value == "/models/llama"
