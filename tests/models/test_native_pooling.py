"""Every native pooling model must compute what transformers computes, on packed batches:
encoders (BERT, RoBERTa, XLM-R) give HF's last hidden state, decoders pooled for embeddings
give HF's base-model states, every *ForSequenceClassification head gives HF's logits (BERT
pairs with token_type_ids too); and a prompt's result does not depend on the prompts packed
next to it."""

from __future__ import annotations

import pytest
import torch
import transformers
from tritonforge.models.pooling_registry import CLASSIFIER_REGISTRY, EMBEDDING_REGISTRY
from tritonforge.models.weight_utils import load_model

ATOL = 1e-4
PROMPT_LENS = [37, 1, 100, 5, 16]  # 100 > the sliding windows of Mistral (64) and Gemma (32)
ENCODERS = ["BertModel", "RobertaModel", "XLMRobertaModel"]
DECODERS = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
            "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM",
            # MoE decoders pool too: their experts fold into fused parameters as in generation.
            "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
            "OlmoeForCausalLM", "GptOssForCausalLM",
            # DeepSeek's MLA layers bind a latent K cache and an empty V as scratch.
            "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"]
CLASSIFIERS = sorted(CLASSIFIER_REGISTRY)


def _prompts(config, seed: int = 0) -> list[torch.Tensor]:
    # Ids above the special tokens, so HF's decoder heads (rightmost token != pad id) and
    # RoBERTa's positions (count of non-pad ids) read the prompts as the engine does.
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(8, config.vocab_size, (n,), generator=gen) for n in PROMPT_LENS]


def _packed(prompts: list[torch.Tensor], types: list[torch.Tensor] | None = None):
    starts = torch.tensor([0, *torch.tensor([len(p) for p in prompts]).cumsum(0).tolist()],
                          dtype=torch.int32)
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    return torch.cat(prompts), positions, starts, None if types is None else torch.cat(types)


@torch.no_grad()
def _run(model, prompts, types=None) -> torch.Tensor:
    return model(*_packed(prompts, types))


def _native(tiny_model, architecture: str, registry: dict[str, type]):
    folder = tiny_model(architecture)
    model, config = load_model(folder, torch.float32, "cpu", model_class=registry[architecture])
    assert type(model) is registry[architecture]
    return folder, model, config


@pytest.mark.parametrize("architecture", ENCODERS + DECODERS)
def test_token_states_equal_transformers_base_model(tiny_model, architecture: str) -> None:
    folder, model, config = _native(tiny_model, architecture, EMBEDDING_REGISTRY)
    hf = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = _prompts(config)
    ours = _run(model, prompts).split(PROMPT_LENS)
    for prompt, states in zip(prompts, ours):
        with torch.no_grad():
            want = hf(input_ids=prompt[None]).last_hidden_state[0]
        torch.testing.assert_close(states, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("architecture", CLASSIFIERS)
def test_classifier_logits_equal_transformers(tiny_model, architecture: str) -> None:
    folder, model, config = _native(tiny_model, architecture, CLASSIFIER_REGISTRY)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, dtype=torch.float32).eval()
    prompts = _prompts(config, seed=1)
    logits = _run(model, prompts)
    assert logits.shape == (len(prompts), 3) and logits.dtype == torch.float32
    for prompt, row in zip(prompts, logits):
        with torch.no_grad():
            want = hf(input_ids=prompt[None]).logits[0]
        torch.testing.assert_close(row, want, atol=ATOL, rtol=0)


def test_bert_cross_encoder_reads_token_type_ids_as_hf_does(tiny_model) -> None:
    folder, model, config = _native(tiny_model, "BertForSequenceClassification",
                                    CLASSIFIER_REGISTRY)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    prompts = _prompts(config, seed=2)
    # A pair: the first part segment 0, the rest segment 1.
    types = [(torch.arange(len(p)) >= len(p) // 2).long() for p in prompts]
    logits = _run(model, prompts, types)
    assert not torch.allclose(logits, _run(model, prompts), atol=1e-3)  # the segments matter
    for prompt, type_ids, row in zip(prompts, types, logits):
        with torch.no_grad():
            want = hf(input_ids=prompt[None], token_type_ids=type_ids[None]).logits[0]
        torch.testing.assert_close(row, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("architecture", ["RobertaModel", "XLMRobertaModel"])
def test_roberta_positions_skip_pad_ids_inside_a_prompt_like_hf(tiny_model, architecture):
    folder, model, config = _native(tiny_model, architecture, EMBEDDING_REGISTRY)
    hf = transformers.AutoModel.from_pretrained(folder).eval()
    prompt = _prompts(config)[0].clone()
    prompt[10:13] = config.pad_token_id  # HF gives these padding_idx and does not count them
    short = _prompts(config, seed=5)[3]
    ours = _run(model, [short, prompt])[len(short):]
    with torch.no_grad():
        want = hf(input_ids=prompt[None]).last_hidden_state[0]
    torch.testing.assert_close(ours, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("architecture", "registry"),
    [(a, EMBEDDING_REGISTRY) for a in ENCODERS + DECODERS]
    + [(a, CLASSIFIER_REGISTRY) for a in CLASSIFIERS],
)
def test_a_prompt_alone_equals_the_same_prompt_in_a_packed_batch(tiny_model, architecture,
                                                                  registry) -> None:
    _, model, config = _native(tiny_model, architecture, registry)
    prompts = _prompts(config, seed=3)
    batched = _run(model, prompts)
    if registry is EMBEDDING_REGISTRY:
        batched = batched.split(PROMPT_LENS)
    for prompt, in_batch in zip(prompts, batched):
        alone = _run(model, [prompt])
        alone = alone if registry is EMBEDDING_REGISTRY else alone[0]
        torch.testing.assert_close(alone, in_batch, atol=1e-5, rtol=0)
