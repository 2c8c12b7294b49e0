"""The pooling runner's inputs: texts and PoolingParams checked against the model, then
tokenized (and truncated) as sentence-transformers would, single texts or score pairs; or
token ids, tokenized elsewhere, checked against the same limits.

Design: every check runs before any batch does, so a bad prompt among many fails the call
with a ValueError (or TypeError) naming its index and the field, and nothing is computed.
Truncation re-tokenizes with the tokenizer's own truncation (not slicing ids), which keeps
the special tokens at both ends, exactly as sentence-transformers truncates; so token ids
cannot be truncated afterwards, only checked against the limit.

`read_pooling_files` reads everything the runner needs besides the weights (config,
task, pooling config, tokenizer, max_model_len); `load_pooling_inputs` builds from it the
same PoolingInputs the runner tokenizes with, for a process that must tokenize exactly as
the runner does without loading the model (the Triton ensembles' CPU tokenizer step).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tritonforge.engine.config import EngineConfig
from tritonforge.engine.pooling_params import PoolingParams
from tritonforge.models.classifier_config import cross_encoder_max_seq_length
from tritonforge.models.loader import (
    resolve_architecture,
    resolve_max_model_len,
    resolve_model_dir,
)
from tritonforge.models.pooling_config import (
    PoolingConfig,
    is_encoder_architecture,
    read_pooling_config,
)
from tritonforge.models.pooling_registry import pooling_task


@dataclass(frozen=True)
class PoolingModelFiles:
    """What a pooling model's folder says besides its weights."""

    model_dir: Path
    config: Any  # the HF PretrainedConfig
    architecture: str
    task: str  # "embed" or "classify" (models/pooling_registry.py)
    pooling_config: PoolingConfig
    tokenizer: Any
    max_model_len: int


def read_pooling_files(engine_config: EngineConfig) -> PoolingModelFiles:
    """Config, task, pooling config, tokenizer and max_model_len of engine_config's model,
    resolved as the pooling runner resolves them; reads no weights."""
    from transformers import AutoConfig, AutoTokenizer

    trust_remote_code = engine_config.trust_remote_code
    # .resolved(): a hub id -> its local snapshot (no-op for local paths)
    model_dir = resolve_model_dir(engine_config.resolved().model)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    architecture = resolve_architecture(config)
    task = pooling_task(architecture)
    if task == "classify":
        # A classifier's head does the pooling; only the length limit matters here.
        # (sentence-transformers CrossEncoder folders carry a modules.json without a
        # Pooling module, which read_pooling_config rightly rejects for embeddings.)
        pooling_config = PoolingConfig(
            pooling_type="CLS" if is_encoder_architecture(architecture) else "LAST",
            normalize=False,
            max_seq_length=cross_encoder_max_seq_length(model_dir),
        )
    else:
        pooling_config = read_pooling_config(model_dir, architecture)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    max_model_len = resolve_max_model_len(engine_config.max_model_len, config, tokenizer,
                                          pooling_config)
    return PoolingModelFiles(model_dir, config, architecture, task, pooling_config, tokenizer,
                             max_model_len)


def load_pooling_inputs(engine_config: EngineConfig) -> PoolingInputs:
    """The PoolingInputs the pooling runner would build for engine_config, without loading
    weights: `encode(texts)` gives the ids `embed_tensors(texts)` would embed (hidden_size,
    which only bounds `dimensions`, is the config's)."""
    files = read_pooling_files(engine_config)
    return PoolingInputs.of(files, int(files.config.get_text_config().hidden_size))


def encode_batch_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of `texts` with special tokens, untruncated: what `tokenizer(texts)` returns
    as input_ids, without building its BatchEncoding.

    Why: for short texts, transformers' per-text Python work around the Rust tokenizer
    (attention masks, token type ids, dict-of-lists assembly) costs more than the encoder's
    forward on a GPU. A fast tokenizer's Rust backend encodes the batch in parallel; only
    its ids are read. Slow tokenizers take the ordinary call.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "split_special_tokens", False):
        return tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
    # transformers resets these on every call too; a truncation or padding left configured
    # in tokenizer.json must not apply here (over-long texts are checked by the caller).
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    return [enc.ids for enc in backend.encode_batch(texts, add_special_tokens=True)]


# How a caller asks for truncation: PoolingParams offline, an input of the same name over
# Triton (the embed / classify ensembles); the error of an over-long text says both.
TRUNCATE_HINT = ("set truncate_prompt_tokens=-1 to truncate to the model limit, or "
                 "truncate_prompt_tokens=k to keep k tokens (PoolingParams offline; over "
                 "Triton the optional INT32 input 'truncate_prompt_tokens')")


@dataclass
class PoolingInputs:
    tokenizer: Any
    max_model_len: int
    pooling_config: PoolingConfig
    hidden_size: int
    vocab_size: int | None = None  # bounds token ids given directly; None: not checked
    type_vocab_size: int = 0  # BERT's segment-id table; 0: the model takes none

    @classmethod
    def of(cls, files: PoolingModelFiles, hidden_size: int) -> PoolingInputs:
        text_config = files.config.get_text_config()
        vocab_size = getattr(text_config, "vocab_size", None)
        type_vocab_size = getattr(text_config, "type_vocab_size", 0)
        return cls(files.tokenizer, files.max_model_len, files.pooling_config, hidden_size,
                   vocab_size if isinstance(vocab_size, int) and vocab_size > 0 else None,
                   type_vocab_size if isinstance(type_vocab_size, int) else 0)

    def encode(
        self, texts: Any, pooling_params: Any = None, method: str = "embed"
    ) -> list[list[int]]:
        """Token ids of `texts`, checked and tokenized (and truncated, per
        truncate_prompt_tokens) exactly as the runner's `method` does before it computes."""
        prompts, params = self.check(texts, pooling_params, method)
        return self.tokenize(prompts, params)

    def check_token_ids(
        self, token_ids: Any, pooling_params: Any, method: str = "embed"
    ) -> tuple[list[list[int]], list[PoolingParams]]:
        """Token ids (one list per prompt, special tokens included, as `encode` returns
        them) checked as `check` and `tokenize` check texts. Ids cannot be re-tokenized, so
        truncate_prompt_tokens only bounds them: truncate when tokenizing."""
        if not isinstance(token_ids, (list, tuple)):
            raise TypeError("token_ids must be a list of token-id lists, got "
                            f"{type(token_ids).__name__}")
        prompts = list(token_ids)
        for i, ids in enumerate(prompts):
            if not isinstance(ids, (list, tuple)):
                raise TypeError(f"token_ids[{i}] must be a list of int, got {type(ids).__name__}")
            if not set(map(type, ids)) <= {int}:
                raise TypeError(f"token_ids[{i}] must hold int token ids only")
        _, params = self.check([""] * len(prompts), pooling_params, method)
        for i, (ids, p) in enumerate(zip(prompts, params)):
            if not ids:
                raise ValueError(f"token_ids[{i}] is empty; nothing to embed")
            tpt = p.truncate_prompt_tokens
            if len(ids) > self.max_model_len:
                raise ValueError(
                    f"token_ids[{i}] has {len(ids)} tokens, more than max_model_len="
                    f"{self.max_model_len}; token ids are not truncated: tokenize the text with "
                    "truncate_prompt_tokens set instead"
                )
            if tpt is not None and tpt != -1 and len(ids) > tpt:
                raise ValueError(
                    f"token_ids[{i}] has {len(ids)} tokens, more than truncate_prompt_tokens="
                    f"{tpt}; token ids are not truncated: tokenize the text with it instead"
                )
            low, high = min(ids), max(ids)
            if low < 0 or (self.vocab_size is not None and high >= self.vocab_size):
                raise ValueError(
                    f"token_ids[{i}] holds id {low if low < 0 else high}, outside the "
                    f"vocabulary [0, {self.vocab_size})"
                )
            prompts[i] = list(ids)
        return prompts, params

    def check_token_type_ids(
        self, token_ids: list[list[int]], token_type_ids: Any
    ) -> list[list[int]] | None:
        """Token type ids (BERT's segment ids: 0 for the first text of a pair, 1 for the
        second) for checked `token_ids`, one list of the same length per prompt; None when
        not given or all 0 (the model's default, so the same result with less work)."""
        if token_type_ids is None:
            return None
        types = [list(row) for row in token_type_ids]
        if len(types) != len(token_ids):
            raise ValueError(f"token_type_ids has {len(types)} rows for {len(token_ids)} "
                             "prompts; give one per prompt")
        for i, (row, ids) in enumerate(zip(types, token_ids)):
            if len(row) != len(ids):
                raise ValueError(f"token_type_ids[{i}] has {len(row)} entries for "
                                 f"{len(ids)} token ids; give one per token")
            if row and not (set(map(type, row)) <= {int} and min(row) >= 0
                            and max(row) < max(self.type_vocab_size, 1)):
                raise ValueError(f"token_type_ids[{i}] must hold ints in [0, "
                                 f"{max(self.type_vocab_size, 1)})")
        return types if any(any(row) for row in types) else None

    def tokenize_pairs(
        self, firsts: list[str], seconds: list[str], truncate_prompt_tokens: int | None
    ) -> tuple[list[list[int]], list[list[int]] | None]:
        # -> pair token ids, and token_type_ids where the tokenizer makes them (BERT)
        if not firsts:
            return [], None
        tok = self.tokenizer
        enc = tok(firsts, seconds, add_special_tokens=True, verbose=False)
        token_ids, type_ids = enc["input_ids"], enc.get("token_type_ids")
        tpt = truncate_prompt_tokens
        limit = self.max_model_len if tpt is None or tpt == -1 else tpt
        over = [i for i, ids in enumerate(token_ids) if len(ids) > limit]
        if over and tpt is None:
            i = over[0]
            raise ValueError(
                f"score: pair {i} (text_2[{i}] with its text_1) has {len(token_ids[i])} "
                f"tokens, more than max_model_len={self.max_model_len}; {TRUNCATE_HINT}"
            )
        if over:
            # Longest-first truncation of the pair, as sentence-transformers' CrossEncoder.
            cut = tok(
                [firsts[i] for i in over], [seconds[i] for i in over],
                add_special_tokens=True, truncation=True, max_length=limit, verbose=False,
            )  # fmt: skip
            for j, i in enumerate(over):
                if len(cut["input_ids"][j]) > limit:
                    raise ValueError(
                        f"truncate_prompt_tokens={limit} is shorter than the special tokens "
                        f"the tokenizer adds to pair {i}"
                    )
                token_ids[i] = cut["input_ids"][j]
                if type_ids is not None:
                    type_ids[i] = cut["token_type_ids"][j]
        return token_ids, type_ids

    def check(
        self, texts: Any, pooling_params: Any, method: str = "embed"
    ) -> tuple[list[str], list[PoolingParams]]:
        if isinstance(texts, str):
            prompts = [texts]
        elif isinstance(texts, (list, tuple)):
            prompts = list(texts)
        else:
            raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}")
        for i, text in enumerate(prompts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
        if pooling_params is None or isinstance(pooling_params, PoolingParams):
            params = [pooling_params or PoolingParams()] * len(prompts)
        elif isinstance(pooling_params, (list, tuple)):
            params = list(pooling_params)
            if len(params) != len(prompts):
                raise ValueError(
                    f"pooling_params has {len(params)} entries for {len(prompts)} texts; pass "
                    "one PoolingParams or one per text"
                )
            for i, p in enumerate(params):
                if not isinstance(p, PoolingParams):
                    raise TypeError(f"pooling_params[{i}] must be a PoolingParams")
        else:
            raise TypeError("pooling_params must be None, a PoolingParams or a list of them")
        for p in {id(p): p for p in params}.values():
            if not method.startswith("embed"):
                for name in ("dimensions", "normalize"):
                    if getattr(p, name) is not None:
                        raise ValueError(
                            f"pooling_params.{name} applies to embed only, not {method}(); "
                            "only truncate_prompt_tokens is used here"
                        )
            p.verify(
                self.hidden_size, self.max_model_len, self.pooling_config.matryoshka_dimensions
            )
        return prompts, params

    def tokenize(self, prompts: list[str], params: list[PoolingParams]) -> list[list[int]]:
        if not prompts:
            return []
        if self.pooling_config.do_lower_case:
            prompts = [p.lower() for p in prompts]
        tok = self.tokenizer
        token_ids = encode_batch_ids(tok, prompts)
        to_cut: dict[int, list[int]] = {}  # token limit -> prompt indices over it
        for i, (ids, p) in enumerate(zip(token_ids, params)):
            tpt = p.truncate_prompt_tokens
            limit = self.max_model_len if tpt is None or tpt == -1 else tpt
            if len(ids) <= limit:
                continue
            if tpt is None:
                raise ValueError(
                    f"texts[{i}] has {len(ids)} tokens, more than max_model_len="
                    f"{self.max_model_len}; {TRUNCATE_HINT}"
                )
            to_cut.setdefault(limit, []).append(i)
        # Re-tokenizing with truncation (rather than slicing ids) keeps the special tokens
        # at both ends, exactly as sentence-transformers truncates.
        for limit, indices in to_cut.items():
            cut = tok(
                [prompts[i] for i in indices],
                add_special_tokens=True, truncation=True, max_length=limit, verbose=False,
            )["input_ids"]  # fmt: skip
            for i, ids in zip(indices, cut):
                if len(ids) > limit:
                    raise ValueError(
                        f"truncate_prompt_tokens={limit} is shorter than the special tokens the "
                        f"tokenizer adds to texts[{i}]"
                    )
                token_ids[i] = ids
        for i, ids in enumerate(token_ids):
            if not ids:
                raise ValueError(f"texts[{i}] tokenizes to no tokens; nothing to embed")
            # A tokenizer larger than the model's embedding would fail the whole batch
            # inside the model (IndexError); refuse the one text instead.
            if self.vocab_size is not None and max(ids) >= self.vocab_size:
                raise ValueError(
                    f"texts[{i}] tokenizes to id {max(ids)}, outside the model's vocabulary "
                    f"[0, {self.vocab_size}): the tokenizer does not match the model"
                )
        return token_ids


def score_pairs(text_1: Any, text_2: Any) -> tuple[list[str], list[str]]:
    """(text_1, text_2) -> lists of pair sides; text_1's has one text (1 -> N) or as many
    as text_2's (N -> N)."""
    sides = []
    for name, value in (("text_1", text_1), ("text_2", text_2)):
        if isinstance(value, str):
            value = [value]
        elif not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a str or a list of str, got {type(value).__name__}")
        for i, text in enumerate(value):
            if not isinstance(text, str):
                raise TypeError(f"{name}[{i}] must be a str, got {type(text).__name__}")
        sides.append(list(value))
    firsts, seconds = sides
    if len(firsts) != 1 and len(firsts) != len(seconds):
        raise ValueError(
            f"score: text_1 has {len(firsts)} texts and text_2 has {len(seconds)}; pass one "
            "text_1 for every text_2 (1 -> N) or lists of equal length (N -> N)"
        )
    return firsts, seconds
