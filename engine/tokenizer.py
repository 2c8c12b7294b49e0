"""The generate engine's tokenizer and its end-of-sequence ids.

A model folder's tokenizer files are used when present; a GGUF checkpoint (a .gguf file or
a folder holding one) carries its tokenizer in its metadata, which transformers reads.
EOS ids are the union of what generation_config.json, the model config and the tokenizer
declare: chat models often end turns with a token that only generation_config names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tritonforge.models.weight_utils import gguf_file


def load_tokenizer(model: str | Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    path = Path(model).expanduser()
    has_files = path.is_dir() and any(
        (path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json",
                                            "tokenizer.model", "vocab.json")
    )
    if not has_files:
        gguf = gguf_file(path)
        if gguf is not None:
            return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def _as_ids(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


def eos_token_ids(model: str | Path, tokenizer: Any, hf_config: Any) -> set[int]:
    ids = _as_ids(getattr(hf_config, "eos_token_id", None))
    ids |= _as_ids(getattr(tokenizer, "eos_token_id", None))
    generation_config = Path(model).expanduser() / "generation_config.json"
    if generation_config.is_file():
        ids |= _as_ids(json.loads(generation_config.read_text()).get("eos_token_id"))
    return ids
