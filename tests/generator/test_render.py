"""Rendering model folders: strict templates, escaped values, Triton-parsable configs,
validated names, and no half-written output."""

from __future__ import annotations

import json

import pytest
from google.protobuf import text_format
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.grpc import model_config_pb2
from tritonforge.generator import render
from tritonforge.generator.errors import UserError


def settings(task: str, **extra: object) -> dict:
    """An ensemble template's context: engine.json's content (`engine`: EngineConfig)."""
    return {"settings": {
        "task": task, "source": "org/model", "instance_count": 2, "instance_kind": "KIND_CPU",
        "tokenizer_instance_count": 1, "engine": {"model": "/models/m", "dtype": "auto"},
        **extra}}


EMBED_CONTEXT = settings("embed", max_batch_size=32, max_queue_delay_us=1000)
GENERATE_CONTEXT = settings("generate", instance_kind="KIND_GPU", instance_count=1,
                            report_custom_metrics=True)
CLASSIFY_CONTEXT = settings("classify", max_batch_size=16, max_queue_delay_us=1000,
                            labels=["negative", "neutral", "positive"])
CONTEXTS = {"embed": EMBED_CONTEXT, "generate": GENERATE_CONTEXT, "classify": CLASSIFY_CONTEXT}
ECHO = {"instance_count": 1}


def _parse(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("template", render.template_names())
def test_every_template_renders_configs_triton_parses(tmp_path, template):
    folder = render.render_model(template, tmp_path, f"m_{template}",
                                 CONTEXTS.get(template, ECHO))
    models = sorted(p.name for p in tmp_path.iterdir())
    for model in models:
        config = _parse(tmp_path / model / "config.pbtxt")
        assert config.name == model and (tmp_path / model / "1").is_dir()
        if config.platform == "ensemble":
            continue
        assert config.backend == "python"
        shim = (tmp_path / model / "1" / "model.py").read_text()
        assert "from tritonforge.backend." in shim and "TritonPythonModel" in shim
    if template == "echo":
        assert models == ["m_echo"]
    else:
        # generate ends in a responses step (it turns a client's cancellation into an abort)
        responses = [f"m_{template}_responses"] if template == "generate" else []
        assert models == sorted([f"m_{template}", f"m_{template}_engine",
                                 f"m_{template}_tokenizer", *responses])
        assert _parse(folder / "config.pbtxt").platform == "ensemble"


@pytest.mark.parametrize("template", ["generate", "embed", "classify"])
def test_the_ensemble_keeps_the_public_interface_and_wires_every_step_input(tmp_path,
                                                                           template):
    render.render_model(template, tmp_path, "m", CONTEXTS[template])
    ensemble = _parse(tmp_path / "m" / "config.pbtxt")
    steps = {s.model_name: s for s in ensemble.ensemble_scheduling.step}
    responses = ["m_responses"] if template == "generate" else []
    assert list(steps) == ["m_tokenizer", "m_engine", *responses]
    public_in = {i.name for i in ensemble.input}
    public_out = {o.name for o in ensemble.output}
    produced = set(public_in)
    for model, step in steps.items():
        config = _parse(tmp_path / model / "config.pbtxt")
        # Every input the step requires is mapped; every mapped tensor exists by then.
        required = {i.name for i in config.input if not i.optional}
        assert required <= set(step.input_map), (model, required - set(step.input_map))
        assert set(step.input_map.values()) <= produced, model
        assert set(step.input_map) <= {i.name for i in config.input}
        assert set(step.output_map) <= {o.name for o in config.output}
        produced |= set(step.output_map.values())
        assert config.max_batch_size >= ensemble.max_batch_size
        if model != "m_responses":  # a pass-through: it reads no engine settings
            assert config.parameters["engine_settings"].string_value == "../m/engine.json"
    assert public_out <= produced
    engine = _parse(tmp_path / "m_engine" / "config.pbtxt")
    assert {o.name: o.data_type for o in engine.output if o.name in public_out} == {
        o.name: o.data_type for o in ensemble.output}
    tokenizer = _parse(tmp_path / "m_tokenizer" / "config.pbtxt")
    assert tokenizer.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    settings = json.loads((tmp_path / "m" / "engine.json").read_text())
    assert settings["name"] == "m" and settings["engine"]["model"] == "/models/m"


def test_ensemble_names_leave_room_for_the_step_suffixes(tmp_path):
    with pytest.raises(UserError, match="invalid model name"):
        render.render_model("embed", tmp_path, "x" * 119, EMBED_CONTEXT)
    render.render_model("embed", tmp_path, "x" * 118, EMBED_CONTEXT)
    assert len(render.sanitize_model_name("y" * 300)) == 118


def test_echo_is_decoupled_with_the_generate_tensor_names(tmp_path):
    config = _parse(render.render_model("echo", tmp_path, "e", ECHO) / "config.pbtxt")
    assert config.model_transaction_policy.decoupled
    assert [i.name for i in config.input] == ["text_input", "stream"]
    assert [o.name for o in config.output] == ["text_output"]


def test_embed_engine_step_carries_batching_and_instances(tmp_path):
    render.render_model("embed", tmp_path, "e", EMBED_CONTEXT)
    config = _parse(tmp_path / "e_engine" / "config.pbtxt")
    assert config.max_batch_size == 32 and config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == 1000
    assert config.instance_group[0].count == 2


@given(st.text(max_size=80))
def test_any_config_value_round_trips_through_pbtxt_without_injection(value):
    config = text_format.Parse(
        f"name: {render.pbtxt_string(value)}", model_config_pb2.ModelConfig()
    )
    assert config.name == value


def test_injected_values_stay_values(tmp_path):
    evil = '/m"\n} } ] instance_group [ { count: 99 kind: KIND_GPU } ] parameters [ { key: "x'
    context = settings("embed", max_batch_size=32, max_queue_delay_us=1000,
                       source='a\nname: "pwn"', engine={"model": evil, "dtype": evil})
    folder = render.render_model("embed", tmp_path, "e", context)
    assert _parse(folder / "config.pbtxt").name == "e"
    config = _parse(tmp_path / "e_engine" / "config.pbtxt")
    assert config.name == "e_engine" and config.instance_group[0].count == 2
    assert json.loads((folder / "engine.json").read_text())["engine"]["model"] == evil


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
    context = {"settings": dict(EMBED_CONTEXT["settings"])}
    del context["settings"]["max_queue_delay_us"]
    with pytest.raises(Exception, match="max_queue_delay_us"):
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
    assert config.max_batch_size == 0
    # An ensemble is decoupled through its decoupled step (Triton sets no policy on it).
    assert _parse(tmp_path / "g_engine" / "config.pbtxt").model_transaction_policy.decoupled
    names = {i.name for i in config.input}
    assert {"text_input", "stream", "sampling_parameters", "exclude_input_in_output",
            "return_finish_reason", "return_cumulative_logprob", "return_logprobs",
            "return_num_input_tokens", "return_num_output_tokens", "messages"} <= names
    assert {o.name for o in config.output} == {
        "text_output", "finish_reason", "cumulative_logprob", "logprobs", "num_input_tokens",
        "num_output_tokens"}
    assert all(i.optional for i in config.input)
