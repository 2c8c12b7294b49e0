"""The pooling runner: embeddings, classes, rewards and scores from encoder and decoder models.

A runner serves one task, decided by the architecture: "classify" for a
*ForSequenceClassification head (classify, classify_tensors, reward, and score when the head
has one label: a cross-encoder), else "embed" (hidden states + pooling: embed,
embed_tensors, and score as the cosine of two embeddings). Asking for the other task's
method is a ValueError naming what the model supports.

The model is native where models/pooling_registry.py registers the architecture (under
model_impl "auto" or "native"), else the Transformers wrapper; both take packed batches.
A call checks and tokenizes every prompt (engine/pooling_inputs.py), packs prompts into batches
of at most max_num_batched_tokens tokens (engine/pooling_batches.py: real tokens for native
models, which compute no padding; padded tokens for the Transformers wrappers, which pad
internally), runs the model, pools, and restores input order. Pooling reads each prompt
once: no KV cache. `tokenize` and the *_token_ids methods split a call in two (the ids,
then the tensors), for callers that tokenize in another process (the Triton ensembles'
CPU step, with load_pooling_inputs: no weights there); the split gives the same tensors.

Invariant: a prompt's embedding does not depend on which other prompts share its batch
(the packed models and the pooler read each sequence's own rows only).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tritonforge.engine.config import EngineConfig
from tritonforge.engine.outputs import (
    ClassificationOutput,
    ClassificationRequestOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    PoolingOutput,
    PoolingRequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from tritonforge.engine.pooler import finalize, pool
from tritonforge.engine.pooling_batches import PackedBatch, plan_pooling_batches
from tritonforge.engine.pooling_inputs import PoolingInputs, read_pooling_files, score_pairs
from tritonforge.engine.pooling_params import PoolingParams
from tritonforge.engine.tensor_parallel import TensorParallelGroup, joined, rank_device
from tritonforge.models.classifier_config import apply_activation, read_classifier_config
from tritonforge.models.layers.parallel_state import TPGroup, building_for
from tritonforge.models.loader import resolve_device, resolve_dtype
from tritonforge.models.pooling_config import PoolingConfig
from tritonforge.models.pooling_registry import POOLING_TASKS, resolve_pooling_model_class
from tritonforge.models.transformers_classifier import TransformersSequenceClassifier
from tritonforge.models.transformers_encoder import TransformersEncoder
from tritonforge.models.weight_utils import check_tensor_parallel, load_model

TASKS = POOLING_TASKS
# Rows of results kept on the device before one copy to the host (bounds device memory for
# huge calls: 65536 x 4096 float32 is 1 GiB at worst).
_PENDING_ROWS = 65536
# The Transformers wrapper of each task, for architectures without a native class.
_TRANSFORMERS_WRAPPERS: dict[str, Callable[..., nn.Module]] = {
    "embed": TransformersEncoder, "classify": TransformersSequenceClassifier,
}
_TASK_METHODS = {
    "embed": ("embed", "embed_tensors", "encode", "score", "embed_token_ids"),
    "classify": ("classify", "classify_tensors", "reward", "score", "classify_token_ids"),
}


class PoolingRunner:
    """A pooling model loaded once; embeds or classifies batches of texts (no KV cache:
    each prompt is read once)."""

    def __init__(self, engine_config: EngineConfig, tp: TPGroup | None = None) -> None:
        """tp: a worker rank's group (engine/tp_worker.py); rank 0 passes None and, at
        tensor_parallel_size > 1, starts the group itself."""
        if engine_config.load_format != "auto":
            raise ValueError(f"load_format {engine_config.load_format!r} is for generation "
                             "benchmarks; the pooling runner reads the checkpoint (use 'auto')")
        self.engine_config = engine_config
        trust_remote_code = engine_config.trust_remote_code
        max_num_batched_tokens = engine_config.max_num_batched_tokens
        self._device = resolve_device(engine_config.device)
        if tp is not None:
            self._device = rank_device(self._device, tp.rank)
        # Everything but the weights, read as load_pooling_inputs reads it (the CPU
        # tokenizer step of the Triton ensembles tokenizes with that, without weights).
        files = read_pooling_files(engine_config)
        model_dir, config, architecture = files.model_dir, files.config, files.architecture
        self._architecture = architecture
        self._task = files.task
        # Fails here, before any weight is read, for model_impl="native" without a native class.
        model_class = resolve_pooling_model_class(architecture, engine_config.model_impl)
        self._dtype = resolve_dtype(engine_config.dtype, config, self._device)
        self._pooling_config = files.pooling_config
        self._tokenizer = files.tokenizer
        self._max_model_len = files.max_model_len
        if max_num_batched_tokens < self._max_model_len:
            raise ValueError(
                f"max_num_batched_tokens must be >= max_model_len ({self._max_model_len}) so the "
                f"longest prompt fits one batch, got {max_num_batched_tokens}"
            )
        self._max_num_batched_tokens = max_num_batched_tokens
        if model_class is None and engine_config.tensor_parallel_size > 1:
            raise ValueError(f"{architecture}: the Transformers backend's pooling models do not "
                             "support tensor_parallel_size > 1 yet; use tensor_parallel_size=1")
        if model_class is not None:  # before any worker starts
            check_tensor_parallel(model_class, engine_config.tensor_parallel_size)
        # Rank 0 of a group: the workers build their shards beside this one.
        self._tp_group: TensorParallelGroup | None = None
        if tp is None and engine_config.tensor_parallel_size > 1:
            self._tp_group = TensorParallelGroup.start(
                engine_config, "pooling", self._device, str(self._dtype).removeprefix("torch."))
        with building_for(tp) if tp is not None else joined(self._tp_group):
            if model_class is None:
                wrapper = _TRANSFORMERS_WRAPPERS[self._task]
                self._model = wrapper(model_dir, self._dtype, self._device, trust_remote_code)
            else:
                self._model, _ = load_model(model_dir, self._dtype, self._device,
                                            trust_remote_code=trust_remote_code,
                                            model_class=model_class)
        self._classifier = (read_classifier_config(model_dir, config)
                            if self._task == "classify" else None)
        self._hidden_size = int(self._model.hidden_size)
        default_dims = self._pooling_config.dimensions
        if default_dims is not None and default_dims > self._hidden_size:
            raise ValueError(
                f"{model_dir}: truncate_dim {default_dims} exceeds hidden size {self._hidden_size}"
            )
        self._inputs = PoolingInputs.of(files, self._hidden_size)
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

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def task(self) -> str:
        """The task this runner serves, "embed" or "classify" (see the module docstring)."""
        return self._task

    @property
    def supported_methods(self) -> tuple[str, ...]:
        methods = _TASK_METHODS[self._task]
        if self._task == "classify" and self._classifier.num_labels != 1:
            methods = tuple(m for m in methods if m != "score")  # score needs one label
        return methods

    @property
    def num_labels(self) -> int | None:
        """The classifier's number of outputs; None for an embedding model."""
        return self._classifier.num_labels if self._task == "classify" else None

    @property
    def id2label(self) -> dict[int, str] | None:
        """Class index -> name, from the model config; None for an embedding model."""
        return dict(self._classifier.id2label) if self._task == "classify" else None

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
        self._require("embed")
        prompts, params = self._inputs.check(texts, pooling_params)
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
        self._require("embed_tensors")
        prompts, params = self._inputs.check(texts, pooling_params)
        size = self._stacked_size(params, "embed_tensors")
        return self._embed_rows(self._inputs.tokenize(prompts, params), params, size, use_tqdm)

    def embed_token_ids(
        self,
        token_ids: Sequence[Sequence[int]],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: bool = False,
    ) -> torch.Tensor:
        """embed_tensors for prompts already tokenized (as `tokenize` does: special tokens
        included, truncated when tokenizing): float32 CPU [N, D], equal to embed_tensors of
        the texts the ids came from. Ids over the limit, empty lists or ids outside the
        vocabulary raise ValueError naming token_ids[i]."""
        self._require("embed_token_ids")
        token_ids, params = self._inputs.check_token_ids(token_ids, pooling_params)
        size = self._stacked_size(params, "embed_token_ids")
        return self._embed_rows(token_ids, params, size, use_tqdm)

    def tokenize(
        self,
        texts: str | Sequence[str],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
    ) -> list[list[int]]:
        """The token ids this runner computes on for `texts` (lowercasing, special tokens,
        the max_model_len check and truncate_prompt_tokens applied), without running the
        model. `engine.pooling_inputs.load_pooling_inputs(config).encode(texts)` gives the
        same ids without loading weights."""
        return self._inputs.encode(texts, pooling_params, self._task)

    def classify(
        self,
        texts: str | Sequence[str],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[ClassificationRequestOutput]:
        """One ClassificationRequestOutput per text: probabilities (the config's activation)
        and the label names, in input order."""
        token_ids, logits = self._classifier_logits("classify", texts, pooling_params, use_tqdm)
        probs = apply_activation(logits, self._classifier.activation).tolist()
        labels = self._classifier.labels
        return [
            ClassificationRequestOutput(
                str(next(self._request_ids)), ids, ClassificationOutput(row, labels)
            )
            for ids, row in zip(token_ids, probs)
        ]

    def classify_tensors(
        self,
        texts: str | Sequence[str],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: bool = False,
    ) -> torch.Tensor:
        """Probabilities as one float32 CPU tensor [N, num_labels]: the backend's path."""
        _, logits = self._classifier_logits("classify_tensors", texts, pooling_params, use_tqdm)
        return apply_activation(logits, self._classifier.activation)

    def classify_token_ids(
        self,
        token_ids: Sequence[Sequence[int]],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: bool = False,
        token_type_ids: Sequence[Sequence[int]] | None = None,
    ) -> torch.Tensor:
        """classify_tensors for prompts already tokenized (see embed_token_ids): float32
        CPU [N, num_labels], equal to classify_tensors of the texts the ids came from.
        token_type_ids: per prompt, as the tokenizer gives them for a text pair (a
        cross-encoder's query and document), so a pair classifies as score() reads it."""
        self._require("classify_token_ids")
        token_ids, _ = self._inputs.check_token_ids(token_ids, pooling_params,
                                                    "classify_token_ids")
        types = self._inputs.check_token_type_ids(token_ids, token_type_ids)
        logits = self._run_batches(token_ids, self._classifier.num_labels, self._classify_batch,
                                   "Classifying", use_tqdm, types)
        return apply_activation(logits, self._classifier.activation)

    def reward(
        self,
        texts: str | Sequence[str],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[PoolingRequestOutput]:
        """One PoolingRequestOutput per text whose `data` is the head's raw output
        [num_labels] (no activation), as vLLM's reward returns."""
        token_ids, logits = self._classifier_logits("reward", texts, pooling_params, use_tqdm)
        return [
            PoolingRequestOutput(str(next(self._request_ids)), ids, PoolingOutput(row))
            for ids, row in zip(token_ids, logits.tolist())
        ]

    def score(
        self,
        text_1: str | Sequence[str],
        text_2: str | Sequence[str],
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = False,
    ) -> list[ScoringRequestOutput]:
        """One ScoringRequestOutput per pair, in text_2's order.

        Pairs: a str (or one-element list) text_1 is scored against every text_2 (1 -> N);
        lists of equal length pair up by index (N -> N). A cross-encoder reads each pair as
        one input, `tokenizer(text_1, text_2)`, and applies sentence-transformers'
        CrossEncoder activation (sigmoid unless the folder saves another); an embedding
        model scores the cosine similarity of the two embeddings.
        truncate_prompt_tokens: as in PoolingParams, per pair (cross-encoder: both texts
        are cut, longest first) or per text (embedding model).
        """
        self._require("score")
        firsts, seconds = score_pairs(text_1, text_2)  # len(firsts) is 1 or len(seconds)
        params = PoolingParams(truncate_prompt_tokens=truncate_prompt_tokens)
        params.verify(self._hidden_size, self._max_model_len)
        n = len(seconds)
        if n == 0:
            return []
        if self._task == "classify":
            firsts = firsts * (n // len(firsts))
            token_ids, type_ids = self._inputs.tokenize_pairs(firsts, seconds,
                                                              truncate_prompt_tokens)
            logits = self._run_batches(
                token_ids, self._classifier.num_labels, self._classify_batch, "Scoring", use_tqdm,
                type_ids,
            )
            scores = apply_activation(logits, self._classifier.score_activation)[:, 0].tolist()
        else:
            # 1 -> N embeds text_1 once; its [1, D] row broadcasts against text_2's [N, D].
            prompts = firsts + seconds
            ids, pooled = self._pool(prompts, [params] * len(prompts), use_tqdm)
            emb = torch.empty_like(pooled)  # the model's default Matryoshka size and norm
            for rows, values in self._finalize(pooled, [params] * len(prompts)):
                emb[rows] = values
            k = len(firsts)
            scores = F.cosine_similarity(emb[:k], emb[k:], dim=-1).tolist()
            token_ids = [ids[i % k] + ids[k + i] for i in range(n)]
        return [
            ScoringRequestOutput(str(next(self._request_ids)), ids, ScoringOutput(float(sc)))
            for ids, sc in zip(token_ids, scores)
        ]

    # ---- internals --------------------------------------------------------------------

    def _require(self, method: str) -> None:
        if method in self.supported_methods:
            return
        if self._task == "classify" and method == "score":
            why = (
                f"score() needs a cross-encoder (a sequence-classification head with one "
                f"label) or an embedding model, but {self._architecture} has "
                f"{self._classifier.num_labels} labels"
            )
        else:
            why = (
                f"{method}() is not supported by this model: {self._architecture} is loaded "
                f"for the {self._task!r} task"
            )
        raise ValueError(f"{why}; it supports {', '.join(self.supported_methods)}")

    def _classifier_logits(
        self, method: str, texts: Any, pooling_params: Any, use_tqdm: bool
    ) -> tuple[list[list[int]], torch.Tensor]:
        # -> token ids per prompt, raw head outputs [N, num_labels] float32 CPU
        self._require(method)
        prompts, params = self._inputs.check(texts, pooling_params, method)
        token_ids = self._inputs.tokenize(prompts, params)
        desc = "Classifying" if method.startswith("classify") else "Rewarding"
        return token_ids, self._run_batches(
            token_ids, self._classifier.num_labels, self._classify_batch, desc, use_tqdm
        )

    @torch.inference_mode()
    def _pool(
        self, prompts: list[str], params: list[PoolingParams], use_tqdm: bool
    ) -> tuple[list[list[int]], torch.Tensor]:
        # -> token ids per prompt, pooled (not yet normalized) embeddings [N, H] float32 CPU
        token_ids = self._inputs.tokenize(prompts, params)
        pooled = self._run_batches(
            token_ids, self._hidden_size, self._embed_batch, "Embedding", use_tqdm
        )
        return token_ids, pooled

    def _stacked_size(self, params: list[PoolingParams], method: str) -> int:
        """D of the [N, D] a *_tensors method returns: one size for all prompts."""
        sizes = {self._dimensions(p) or self._hidden_size for p in params}
        if len(sizes) > 1:
            raise ValueError(
                f"pooling_params: {method} needs one output size for all prompts, got "
                f"dimensions {sorted(sizes)}"
            )
        return sizes.pop() if sizes else self._dimensions(PoolingParams()) or self._hidden_size

    def _embed_rows(self, token_ids: list[list[int]], params: list[PoolingParams], size: int,
                    use_tqdm: bool) -> torch.Tensor:
        # -> finalized embeddings [N, size] float32 CPU, in input order
        pooled = self._run_batches(token_ids, self._hidden_size, self._embed_batch, "Embedding",
                                   use_tqdm)
        out = torch.empty(len(token_ids), size, dtype=torch.float32)
        for rows, emb in self._finalize(pooled, params):
            out[rows] = emb
        return out

    def _embed_batch(self, batch: PackedBatch) -> torch.Tensor:
        # -> pooled [B, H] float32
        hidden = self._call_model(batch.input_ids, batch.positions, batch.seq_start_loc)  # [N, H]
        return pool(hidden, batch.seq_start_loc, self._pooling_config.pooling_type)

    def _classify_batch(self, batch: PackedBatch) -> torch.Tensor:
        # -> logits [B, num_labels] float32
        return self._call_model(batch.input_ids, batch.positions, batch.seq_start_loc,
                           batch.token_type_ids)

    def _call_model(self, *args: torch.Tensor | None) -> torch.Tensor:
        """The model's forward; rank 0 of a group first sends the batch to the other ranks."""
        if self._tp_group is None:
            return self._model(*args)
        # As numpy: a pickled torch tensor travels as a shared-memory handle that only a
        # process of the same multiprocessing family can open.
        self._tp_group.broadcast("forward", tuple(
            a.cpu().numpy() if isinstance(a, torch.Tensor) else a for a in args))
        try:
            return self._model(*args)
        except Exception as err:  # a rank's failure surfaces here as a failed collective
            raise self._tp_group.explain(err) from err

    @torch.inference_mode()
    def run_forward(self, args: tuple[np.ndarray | None, ...]) -> None:
        """A worker rank's forward of rank 0's batch (its output is rank 0's to pool)."""
        self._model(*(None if a is None else torch.from_numpy(a).to(self._device)
                      for a in args))

    def shutdown(self) -> None:
        """Stops the other ranks of a tensor-parallel group (nothing to do at size 1)."""
        if self._tp_group is not None:
            self._tp_group.shutdown()

    @torch.inference_mode()
    def _run_batches(
        self,
        token_ids: list[list[int]],
        width: int,
        forward: Callable[..., torch.Tensor],
        desc: str,
        use_tqdm: bool,
        token_type_ids: list[list[int]] | None = None,
    ) -> torch.Tensor:
        # -> forward's rows [N, width] float32 CPU, in input order; forward maps a
        # PackedBatch of B prompts to [B, width]
        out = torch.empty(len(token_ids), width, dtype=torch.float32)
        pads_batches = getattr(self._model, "pads_batches", False)
        batches = plan_pooling_batches([len(ids) for ids in token_ids],
                                       self._max_num_batched_tokens, pads_batches)
        progress = None
        if use_tqdm:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(token_ids), desc=desc, unit="prompt")
        # Results stay on the device until _PENDING_ROWS rows wait (or the end): copying each
        # batch to the host at once would make the host wait for the GPU every batch, instead
        # of packing and launching the next batch while the GPU computes this one.
        pending: list[torch.Tensor] = []
        pending_rows: list[int] = []
        for batch in batches:
            types = None if token_type_ids is None else [token_type_ids[i] for i in batch]
            packed = PackedBatch.of([token_ids[i] for i in batch], types, self._device)
            pending.append(forward(packed).float())
            pending_rows.extend(batch)
            if len(pending_rows) >= _PENDING_ROWS:
                out[pending_rows] = torch.cat(pending).cpu()
                pending, pending_rows = [], []
            if progress is not None:
                progress.update(len(batch))
        if pending:
            out[pending_rows] = torch.cat(pending).cpu()
        if progress is not None:
            progress.close()
        return out

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
