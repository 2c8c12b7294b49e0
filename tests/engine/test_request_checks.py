"""One door for prompts and one resolver for max_model_len: the same rule, the same words,
whoever asks (offline LLM, engine core, Triton steps); RoBERTa-style position tables give
their exact token limit."""

from __future__ import annotations

import pytest
import transformers
from tritonforge.engine import LLM, SamplingParams
from tritonforge.engine.request_checks import check_prompt
from tritonforge.models.loader import DEFAULT_MAX_MODEL_LEN, position_limit, resolve_max_model_len


@pytest.mark.parametrize(("ids", "fragment"), [
    ([], "text_input tokenizes to no tokens"),
    ([3, 99], "text_input tokenizes to id 99, outside the model's vocabulary [0, 50)"),
    ([3, -1], "id -1, outside"),
    (list(range(1, 17)),
     "text_input is too long: the prompt has 16 tokens and max_model_len is 16"),
])
def test_a_bad_prompt_is_refused_naming_its_field(ids, fragment):
    with pytest.raises(ValueError) as info:
        check_prompt(ids, SamplingParams(), 16, 50, field="text_input", tokenized=True)
    assert fragment in str(info.value)


def test_max_tokens_past_the_room_names_the_parameters_field():
    with pytest.raises(ValueError, match=r"^sampling_parameters: max_tokens must be <= 6"):
        check_prompt([1] * 10, SamplingParams(max_tokens=7), 16, 50,
                     params_field="sampling_parameters")
    assert check_prompt([1] * 10, SamplingParams(max_tokens=None), 16, 50) == 6


def test_max_model_len_comes_from_the_text_config_and_the_padding_offset():
    roberta = transformers.RobertaConfig(max_position_embeddings=514, pad_token_id=1)
    assert position_limit(roberta) == 512  # bge-reranker-base: 514 rows hold 512 tokens
    xlmr = transformers.XLMRobertaConfig(max_position_embeddings=8194, pad_token_id=1)
    assert position_limit(xlmr) == 8192  # bge-m3
    assert resolve_max_model_len(None, transformers.LlamaConfig(max_position_embeddings=300)) \
        == 300
    gemma3 = transformers.Gemma3Config(text_config={"max_position_embeddings": 4096})
    assert resolve_max_model_len(None, gemma3) == 4096  # nested text config
    with pytest.raises(ValueError, match=r"max_model_len must be between 1 and 512"):
        resolve_max_model_len(513, roberta)
    # GPT-2 names its limit n_positions: read through the config's attribute map.
    assert resolve_max_model_len(None, transformers.GPT2Config(n_positions=640)) == 640
    assert resolve_max_model_len(None, transformers.PretrainedConfig()) == DEFAULT_MAX_MODEL_LEN


def test_a_roberta_model_embeds_exactly_its_limit_and_refuses_one_more(tiny_model):
    path = tiny_model("RobertaModel", config_overrides={"max_position_embeddings": 34})
    llm = LLM(model=str(path), runner="pooling", device="cpu")
    assert llm.max_model_len == 32
    tokenizer = llm.get_tokenizer()
    words = next(n for n in range(1, 64)
                 if len(tokenizer(" ".join(["sea"] * n))["input_ids"]) >= 32)
    at_limit, over = " ".join(["sea"] * words), " ".join(["sea"] * (words + 1))
    assert len(tokenizer(at_limit)["input_ids"]) == 32  # <s> ... </s>
    assert len(llm.embed([at_limit])[0].outputs.embedding) > 0
    with pytest.raises(ValueError, match="max_model_len"):
        llm.embed([over])
