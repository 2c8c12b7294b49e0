"""The pooling registries decide native vs Transformers like generation's registry does, and
the generator's torch-free table says the same thing."""

from __future__ import annotations

import pytest
from tritonforge.generator import architectures as table
from tritonforge.models.bert import BertForSequenceClassification, BertModel
from tritonforge.models.pooling_registry import (
    CLASSIFIER_REGISTRY,
    EMBEDDING_REGISTRY,
    pooling_task,
    resolve_pooling_model_class,
)
from tritonforge.models.registry import MODEL_REGISTRY


def test_auto_and_native_pick_the_registered_class_and_transformers_forces_the_wrapper():
    for impl in ("auto", "native"):
        assert resolve_pooling_model_class("BertModel", impl) is BertModel
        assert resolve_pooling_model_class("BertForSequenceClassification", impl) is (
            BertForSequenceClassification)
    assert resolve_pooling_model_class("BertModel", "transformers") is None
    assert resolve_pooling_model_class("DebertaV2ForSequenceClassification", "auto") is None
    assert resolve_pooling_model_class("MPNetModel", "auto") is None


def test_native_for_an_unregistered_architecture_lists_the_supported_of_its_task():
    with pytest.raises(ValueError, match=r"'MPNetModel'.*'embed'.*supported: BertModel, "):
        resolve_pooling_model_class("MPNetModel", "native")
    with pytest.raises(ValueError, match=r"'classify'.*supported: BertForSequenceClassification"):
        resolve_pooling_model_class("DebertaV2ForSequenceClassification", "native")
    with pytest.raises(ValueError, match="model_impl must be one of"):
        resolve_pooling_model_class("BertModel", "vllm")


def test_every_registered_architecture_serves_its_registry_task():
    assert all(pooling_task(a) == "embed" for a in EMBEDDING_REGISTRY)
    assert all(pooling_task(a) == "classify" for a in CLASSIFIER_REGISTRY)
    # Every native decoder also pools natively (LAST-token embeddings).
    assert set(MODEL_REGISTRY) <= set(EMBEDDING_REGISTRY)


def test_the_generator_table_equals_the_pooling_registries():
    assert set(EMBEDDING_REGISTRY) == (set(table.POOLING_ENCODERS) | set(table.NATIVE_GENERATE)
                                       | set(table.NATIVE_EMBED_DECODERS))
    assert set(CLASSIFIER_REGISTRY) == set(table.NATIVE_CLASSIFY)
    for architecture in (*table.POOLING_ENCODERS, *table.NATIVE_EMBED_DECODERS,
                         *table.NATIVE_CLASSIFY):
        assert table.support(architecture).implementation == table.NATIVE, architecture
    assert table.support("DebertaV2ForSequenceClassification").implementation == (
        table.TRANSFORMERS)
    native_rows = {(r["task"], r["architecture"]) for r in table.supported_table()
                   if r["implementation"] == table.NATIVE}
    assert {a for task, a in native_rows if task == "classify"} == set(CLASSIFIER_REGISTRY)
    # Every native embedder is listed, the native decoders too (they pool their last token).
    assert {a for task, a in native_rows if task == "embed"} == set(EMBEDDING_REGISTRY)
