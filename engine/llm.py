"""The offline API: `LLM(model=..., runner="pooling")` and its embed / encode methods.

Design: the same object users know from vLLM, backed for now by the pooling runner only
(the paged-KV generate runner lands with its own issue; until then any other `runner` is a
ValueError rather than a stub). A call tokenizes every prompt, checks it against
max_model_len, sorts prompts by length and packs them into batches of at most
max_num_batched_tokens padded tokens, each padded to under twice its shortest prompt (so
padding is under half of any batch), runs the model, pools, and restores input order.
Pooling reads each prompt once: no KV cache.

Invariant: a prompt's embedding does not depend on which other prompts share its batch or
how the batch is padded (the pooler follows the attention mask).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tritonforge.engine.batching import pad_batch, plan_batches
from tritonforge.engine.outputs import EmbeddingOutput, EmbeddingRequestOutput
from tritonforge.engine.pooler import finalize, pool
from tritonforge.engine.pooling_params import PoolingParams
from tritonforge.models.loader import (
    resolve_architecture,
    resolve_device,
    resolve_dtype,
    resolve_max_model_len,
    resolve_model_dir,
)
from tritonforge.models.pooling_config import PoolingConfig, read_pooling_config
from tritonforge.models.transformers_encoder import TransformersEncoder

RUNNERS = ("pooling",)
MODEL_IMPLS = ("auto", "native", "transformers")

# model_impl -> builder(model_dir, dtype, device, trust_remote_code) of the pooling module,
# whose forward maps (input_ids, attention_mask) [B, T] to the last hidden state [B, T, H].
# The models issue adds "native" (native BertModel, looked up by architecture in the
# models registry); "auto" will then prefer native where the architecture has one.
_POOLING_MODEL_IMPLS: dict[str, Callable[..., nn.Module]] = {"transformers": TransformersEncoder}


class LLM:
    """Load a model folder once, then embed batches of texts with it."""

    def __init__(
        self,
        model: str | Path,
        runner: str = "pooling",
        model_impl: str = "auto",
        dtype: str = "auto",
        max_model_len: int | None = None,
        device: str | torch.device = "auto",
        trust_remote_code: bool = False,
        seed: int = 0,
        max_num_batched_tokens: int = 16384,
    ) -> None:
        if runner not in RUNNERS:
            raise ValueError(
                f"runner must be one of {RUNNERS}, got {runner!r} (the generate runner is not "
                "built yet)"
            )
        if model_impl not in MODEL_IMPLS:
            raise ValueError(f"model_impl must be one of {MODEL_IMPLS}, got {model_impl!r}")
        if max_model_len is not None and not _is_positive_int(max_model_len):
            raise ValueError(f"max_model_len must be None or an int >= 1, got {max_model_len!r}")
        if not _is_positive_int(max_num_batched_tokens):
            raise ValueError(
                f"max_num_batched_tokens must be an int >= 1, got {max_num_batched_tokens!r}"
            )
        if trust_remote_code is not True and trust_remote_code is not False:
            raise ValueError(f"trust_remote_code must be True or False, got {trust_remote_code!r}")
        if not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        # Pooling is deterministic; the seed is kept for the generate runner's samplers.
        self.seed = seed
        self._device = resolve_device(device)

        from transformers import AutoConfig, AutoTokenizer

        model_dir = resolve_model_dir(model)
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        architecture = resolve_architecture(config)
        build_model = _select_model_impl(model_impl, architecture)
        self._dtype = resolve_dtype(dtype, config, self._device)
        self._pooling_config = read_pooling_config(model_dir, architecture)
        self._tokenizer = AutoTokenizer.from_pretrained(
            model_dir, trust_remote_code=trust_remote_code
        )
        self._max_model_len = resolve_max_model_len(
            max_model_len, config, self._tokenizer, self._pooling_config
        )
        if max_num_batched_tokens < self._max_model_len:
            raise ValueError(
                f"max_num_batched_tokens must be >= max_model_len ({self._max_model_len}) so the "
                f"longest prompt fits one batch, got {max_num_batched_tokens}"
            )
        self._max_num_batched_tokens = max_num_batched_tokens
        self._model = build_model(model_dir, self._dtype, self._device, trust_remote_code)
        self._hidden_size = int(self._model.hidden_size)
        default_dims = self._pooling_config.dimensions
        if default_dims is not None and default_dims > self._hidden_size:
            raise ValueError(
                f"{model_dir}: truncate_dim {default_dims} exceeds hidden size {self._hidden_size}"
            )
        pad = self._tokenizer.pad_token_id
        self._pad_token_id = (
            pad if pad is not None else (getattr(config, "pad_token_id", None) or 0)
        )
        self._request_ids = itertools.count()

    # ---- public API -------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def pooling_config(self) -> PoolingConfig:
        return self._pooling_config

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def hidden_size(self) -> int:
        return self._hidden_size

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def apply_model(self, fn: Callable[[nn.Module], Any]) -> Any:
        """Call `fn` on the loaded nn.Module (inspection, hooks) and return its result."""
        return fn(self._model)

    def embed(
        self,
        texts: str | Sequence[str],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[EmbeddingRequestOutput]:
        """One EmbeddingRequestOutput per text, in input order."""
        prompts, params = self._check_inputs(texts, pooling_params)
        token_ids, pooled = self._pool(prompts, params, use_tqdm)
        embeddings: list[list[float]] = [[] for _ in prompts]
        for rows, emb in self._finalize(pooled, params):
            for row, values in zip(rows, emb.tolist()):
                embeddings[row] = values
        return [
            EmbeddingRequestOutput(str(next(self._request_ids)), ids, EmbeddingOutput(emb))
            for ids, emb in zip(token_ids, embeddings)
        ]

    encode = embed

    def embed_tensors(
        self,
        texts: str | Sequence[str],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: bool = False,
    ) -> torch.Tensor:
        """Embeddings as one float32 CPU tensor [N, D]: the backend's path, no Python floats.

        All prompts must resolve to the same `dimensions` (D), so the rows stack.
        """
        prompts, params = self._check_inputs(texts, pooling_params)
        sizes = {self._dimensions(p) or self._hidden_size for p in params}
        if len(sizes) > 1:
            raise ValueError(
                f"pooling_params: embed_tensors needs one output size for all prompts, got "
                f"dimensions {sorted(sizes)}"
            )
        size = sizes.pop() if sizes else self._dimensions(PoolingParams()) or self._hidden_size
        _, pooled = self._pool(prompts, params, use_tqdm)
        out = torch.empty(len(prompts), size, dtype=torch.float32)
        for rows, emb in self._finalize(pooled, params):
            out[rows] = emb
        return out

    # ---- internals --------------------------------------------------------------------

    def _check_inputs(
        self, texts: Any, pooling_params: Any
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
            p.verify(
                self._hidden_size, self._max_model_len, self._pooling_config.matryoshka_dimensions
            )
        return prompts, params

    def _tokenize(self, prompts: list[str], params: list[PoolingParams]) -> list[list[int]]:
        if not prompts:
            return []
        if self._pooling_config.do_lower_case:
            prompts = [p.lower() for p in prompts]
        tok = self._tokenizer
        token_ids = tok(prompts, add_special_tokens=True, verbose=False)["input_ids"]
        to_cut: dict[int, list[int]] = {}  # token limit -> prompt indices over it
        for i, (ids, p) in enumerate(zip(token_ids, params)):
            tpt = p.truncate_prompt_tokens
            limit = self._max_model_len if tpt is None or tpt == -1 else tpt
            if len(ids) <= limit:
                continue
            if tpt is None:
                raise ValueError(
                    f"texts[{i}] has {len(ids)} tokens, more than max_model_len="
                    f"{self._max_model_len}; set PoolingParams(truncate_prompt_tokens=-1) to "
                    "truncate to the model limit, or truncate_prompt_tokens=k to keep k tokens"
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
        return token_ids

    @torch.inference_mode()
    def _pool(
        self, prompts: list[str], params: list[PoolingParams], use_tqdm: bool
    ) -> tuple[list[list[int]], torch.Tensor]:
        # -> token ids per prompt, pooled (not yet normalized) embeddings [N, H] float32 CPU
        token_ids = self._tokenize(prompts, params)
        pooled = torch.empty(len(token_ids), self._hidden_size, dtype=torch.float32)
        batches = plan_batches([len(ids) for ids in token_ids], self._max_num_batched_tokens)
        progress = None
        if use_tqdm:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(token_ids), desc="Embedding", unit="prompt")
        for batch in batches:
            input_ids, attention_mask = pad_batch([token_ids[i] for i in batch], self._pad_token_id)
            input_ids = input_ids.to(self._device, non_blocking=True)
            attention_mask = attention_mask.to(self._device, non_blocking=True)
            hidden = self._model(input_ids, attention_mask)  # [B, T, H]
            emb = pool(hidden, attention_mask, self._pooling_config.pooling_type)
            pooled[batch] = emb.cpu()
            if progress is not None:
                progress.update(len(batch))
        if progress is not None:
            progress.close()
        return token_ids, pooled

    def _dimensions(self, p: PoolingParams) -> int | None:
        return p.dimensions if p.dimensions is not None else self._pooling_config.dimensions

    def _finalize(
        self, pooled: torch.Tensor, params: list[PoolingParams]
    ) -> list[tuple[list[int], torch.Tensor]]:
        """Matryoshka + normalize, once per distinct (normalize, dimensions) group of rows."""
        groups: dict[tuple[bool, int | None], list[int]] = {}
        for row, p in enumerate(params):
            normalize = p.normalize if p.normalize is not None else self._pooling_config.normalize
            groups.setdefault((normalize, self._dimensions(p)), []).append(row)
        return [
            (rows, finalize(pooled[rows], normalize, dims))
            for (normalize, dims), rows in groups.items()
        ]


def _select_model_impl(model_impl: str, architecture: str) -> Callable[..., nn.Module]:
    if model_impl == "auto":
        return _POOLING_MODEL_IMPLS["transformers"]
    if model_impl not in _POOLING_MODEL_IMPLS:
        allowed = ("auto", *_POOLING_MODEL_IMPLS)
        raise ValueError(
            f"model_impl={model_impl!r}: no native pooling implementation exists yet (not for "
            f"{architecture} nor any other architecture); model_impl must be one of {allowed}"
        )
    return _POOLING_MODEL_IMPLS[model_impl]


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
