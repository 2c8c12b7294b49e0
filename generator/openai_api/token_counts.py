"""Token counts for the `usage` of /v1/embeddings and /v1/rerank.

The pooling ensembles return vectors and scores only, so the OpenAI server counts the
tokens itself with the model's own tokenizer.json (the Rust `tokenizers` library: no torch),
special tokens included and capped at the model's length limit, as the tokenizer step
truncates. A model whose tokenizer.json is not on this machine (a hub id the server
downloads) reports no count: `usage` then says 0 rather than guess.
"""

from __future__ import annotations

import json
from pathlib import Path


class TokenCounter:
    def __init__(self, model_dir: str | None, max_model_len: int | None) -> None:
        self._tokenizer = None
        self.limit = max_model_len
        folder = Path(model_dir).expanduser() if model_dir else None
        if folder is None or not (folder / "tokenizer.json").is_file():
            return
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        if self.limit is None:
            try:
                config = json.loads((folder / "tokenizer_config.json").read_text())
                limit = config.get("model_max_length")
            except (OSError, ValueError, AttributeError):
                limit = None
            self.limit = limit if isinstance(limit, int) and 0 < limit < 1_000_000 else None

    @property
    def available(self) -> bool:
        return self._tokenizer is not None

    def count(self, texts: list[str], pairs: list[str] | None = None) -> int:
        if self._tokenizer is None:
            return 0
        encodings = (self._tokenizer.encode_batch(list(zip(texts, pairs))) if pairs is not None
                     else self._tokenizer.encode_batch(texts))
        lengths = [len(e.ids) for e in encodings]
        return sum(min(n, self.limit) if self.limit else n for n in lengths)
