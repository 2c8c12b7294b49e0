"""The generate engine: requests in, one continuous-batching step at a time, outputs out.

One step: the scheduler picks decodes and prefill chunks under the token budget (and
preempts by recompute when blocks run out); the runner computes them in one flat batch
over the paged KV cache and returns logits for the sequences that finished their
uncomputed tokens; the sampler picks their next tokens; each request's detokenizer and
stop checker turn tokens into text and finish reasons. Finished and aborted requests free
their blocks at once.

Not thread-safe: one thread drives step(); AsyncEngine wraps it for concurrent callers.
"""

from __future__ import annotations

import itertools
import logging
import time
from concurrent.futures import Future, wait
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from tritonforge.engine import stop_checker
from tritonforge.engine.block_manager import BlockManager
from tritonforge.engine.config import EngineConfig
from tritonforge.engine.detokenizer import IncrementalDetokenizer
from tritonforge.engine.guided_decoding import GuidedDecoding, GuidedStats
from tritonforge.engine.model_runner import ModelRunner
from tritonforge.engine.multimodal import MultiModalData
from tritonforge.engine.outputs import CompletionOutput, RequestOutput, Snapshot
from tritonforge.engine.parallel_sampling import (
    CHILD_SEPARATOR,
    ParallelRequest,
    child_params,
    child_request_id,
)
from tritonforge.engine.request_checks import check_prompt
from tritonforge.engine.sampler import Sampler, SamplingMetadata, request_generator
from tritonforge.engine.sampling_metadata import UniformSamplingMetadata, plain_temperature
from tritonforge.engine.sampling_params import SamplingParams
from tritonforge.engine.scheduler import Scheduler
from tritonforge.engine.sequence import MultimodalState, Sequence
from tritonforge.engine.tensor_parallel import TensorParallelGroup, joined
from tritonforge.engine.tokenizer import eos_token_ids, load_tokenizer
from tritonforge.models.loader import (
    resolve_architecture,
    resolve_device,
    resolve_dtype,
    resolve_max_model_len,
)
from tritonforge.models.registry import resolve_model_class
from tritonforge.models.transformers_multimodal import MultimodalLayout
from tritonforge.models.weight_utils import check_tensor_parallel, load_config, load_model

logger = logging.getLogger(__name__)
# How long step() waits for a grammar when nothing else can run (then it returns, so the
# caller's loop sees new requests and aborts).
_GRAMMAR_WAIT_S = 0.05


@dataclass(eq=False)
class _Request:
    """Per-request state beside its Sequence: text, logprobs and what was reported."""

    seq: Sequence
    prompt: str | None
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None  # None when token_only
    generator: torch.Generator | None
    logprobs: list[dict[int, float]] | None
    cumulative_logprob: float = 0.0
    stream: bool = True  # report every step (and keep its text current) or only the end
    # No text at all: the engine-core process reports token ids, and its front ends
    # detokenize and apply stop strings (engine/output_processor.py).
    token_only: bool = False
    # Per-request constants of the step loop, decided once in add_request:
    lazy: bool = False  # not streamed and no stop strings: text decoded once at the end
    plain_temperature: float | None = None  # sampling_metadata.plain_temperature(params)
    stop_token_set: frozenset[int] = frozenset()  # ids that stop it (past min_tokens)
    length_limit: int = 0  # num_tokens at which it finishes with "length"
    prompt_token_ids: list[int] = field(default_factory=list)  # one copy, shared by outputs
    text: str = ""  # the output text so far (cut at a stop string when one matched)
    reported_text: int = 0  # characters already reported in text deltas
    reported_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # n > 1: the request this is child `index` of (engine/parallel_sampling.py)
    parent: ParallelRequest | None = None
    index: int = 0
    # Structured outputs: the grammar being compiled (not scheduled until it is), then the
    # sequence's llguidance matcher (engine/guided_decoding.py)
    grammar: Future | None = None
    matcher: Any = None
    grammar_error: str | None = None  # the grammar refused a token: the request ends


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of blocks held by requests (cached free ones excluded)
    num_preemptions: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens served from it


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        config = config.resolved()  # a hub id -> its local snapshot (no-op for local paths)
        self.config = config
        self.device = resolve_device(config.device)
        if self.device.type == "cuda" and self.device.index is not None:
            # Triton kernels and CUDA graphs run on the *current* device, not the tensors':
            # a Triton model instance pinned to GPU N (its own stub process) must make N
            # current before anything is launched.
            torch.cuda.set_device(self.device)
        hf_config = load_config(config.model, trust_remote_code=config.trust_remote_code)
        self.dtype = resolve_dtype(config.dtype, hf_config, self.device)
        self.max_model_len = resolve_max_model_len(config.max_model_len, hf_config)
        self.tokenizer = load_tokenizer(config.tokenizer or config.model,
                                        trust_remote_code=config.trust_remote_code)
        # tensor_parallel_size > 1: this process is rank 0 and starts the other ranks, which
        # build their shards beside this one (engine/tensor_parallel.py).
        self.tp_group: TensorParallelGroup | None = None
        if config.tensor_parallel_size > 1:
            # A model that cannot be split is refused before any worker starts.
            check_tensor_parallel(resolve_model_class(resolve_architecture(hf_config),
                                                      config.model_impl),
                                  config.tensor_parallel_size)
            self.tp_group = TensorParallelGroup.start(
                config, "generate", self.device, str(self.dtype).removeprefix("torch."),
                self.max_model_len)
        with joined(self.tp_group) as tp:
            self.model, self.hf_config = load_model(
                config.model, self.dtype, self.device, model_impl=config.model_impl,
                trust_remote_code=config.trust_remote_code, load_format=config.load_format,
            )
            # The text config: a vision-language config nests the language model's fields.
            self.vocab_size = int(self.hf_config.get_text_config().vocab_size)
            self.runner = ModelRunner(config, self.model, self.hf_config, self.device,
                                      self.dtype, self.max_model_len, tp, self.tp_group)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens, self.max_model_len)
        self.sampler = Sampler(seed=config.seed, device=self.device)
        self.uniform_metadata = UniformSamplingMetadata(self.device)
        self.eos_token_ids = eos_token_ids(config.model, self.tokenizer, self.hf_config)
        self._requests: dict[str, _Request] = {}  # by sequence id (a child's for n > 1)
        self._parents: dict[str, ParallelRequest] = {}  # requests with n > 1, by their id
        self._guided: GuidedDecoding | None = None  # made by the first structured request
        self._compiling: list[_Request] = []  # in arrival order, waiting for their grammar
        # Constrained requests whose last token the grammar thread is feeding to their
        # matchers (GuidedDecoding.advance), in the order fed.
        self._advancing: list[_Request] = []
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stops the other ranks of a tensor-parallel group (nothing to do at size 1)."""
        if self.tp_group is not None:
            self.tp_group.shutdown()

    @property
    def fatal_error(self) -> str | None:
        """Why no step can run any more (a rank of its group died), or None."""
        return None if self.tp_group is None else self.tp_group.dead

    # ---- requests -----------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def add_request(
        self,
        request_id: str | None,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        stream: bool = True,
        detokenize: bool = True,
        multi_modal_data: MultiModalData | None = None,
    ) -> str:
        """Queues a request (text, or token ids); returns its id. Raises ValueError for a
        prompt that cannot run (empty, ids outside the vocabulary, too long for
        max_model_len with max_tokens).

        stream=False: step() reports the request only when it finishes, and its text is
        decoded once at the end unless stop strings need it token by token (the offline
        API's batch generation: detokenizing every step would cost more than the GPU).

        detokenize=False: no text and no stop strings here, only token-level stops (EOS,
        stop_token_ids, min_tokens, max_tokens, max_model_len); the caller detokenizes and
        aborts the request when one of its stop strings matches (the engine core's mode).

        multi_modal_data: a vision-language model's images, as its processor prepared them
        for `prompt` (token ids with the placeholders expanded; engine/multimodal.py).
        """
        params = params or SamplingParams()
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self._requests or request_id in self._parents:
            raise ValueError(f"request_id {request_id!r} is already running")
        if CHILD_SEPARATOR in request_id:
            raise ValueError(f"request_id {request_id!r} holds {CHILD_SEPARATOR!r}, which "
                             "names the completions of a request with n > 1")
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenize(prompt)
        else:
            text, token_ids = None, [int(t) for t in prompt]
        # The one door (engine/request_checks.py): an id past the model's embedding would
        # raise IndexError inside step() and fail every request in flight, so it is refused
        # here, as are empty and too-long prompts.
        max_tokens = check_prompt(token_ids, params, self.max_model_len, self.vocab_size,
                                  tokenized=text is not None)
        if max_tokens != params.max_tokens:
            params = _with_max_tokens(params, max_tokens)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        mm_layout = self._check_images(token_ids, multi_modal_data)
        grammar = None
        if params.structured_outputs is not None:  # one compile, shared by the n completions
            if self._guided is None:
                self._guided = GuidedDecoding(self.tokenizer, self.vocab_size,
                                              self.eos_token_ids,
                                              pin_memory=self.device.type == "cuda")
            grammar = self._guided.compile(params.structured_outputs)
        if params.n == 1:
            self._add_sequence(request_id, text, token_ids, params, arrival, stream,
                               detokenize, max_tokens, grammar=grammar, mm=mm_layout)
            return request_id
        # n completions: n sequences, the first leading (the others share its prompt blocks).
        parent = ParallelRequest(request_id, params.n, text, token_ids)
        leader: Sequence | None = None
        for index in range(params.n):
            child = self._add_sequence(  # each sequence appends to a list of its own
                child_request_id(request_id, index), text, list(token_ids),
                child_params(params, index), arrival, stream, detokenize, max_tokens,
                leader=leader, parent=parent, index=index, grammar=grammar, mm=mm_layout)
            leader = leader or child.seq
        self._parents[request_id] = parent
        return request_id

    def _add_sequence(self, seq_id: str, text: str | None, token_ids: list[int],
                      params: SamplingParams, arrival: float, stream: bool, detokenize: bool,
                      max_tokens: int, leader: Sequence | None = None,
                      parent: ParallelRequest | None = None, index: int = 0,
                      grammar: Future | None = None,
                      mm: tuple[MultiModalData, MultimodalLayout, torch.Tensor] | None = None
                      ) -> _Request:
        seq = Sequence(seq_id, token_ids, params, arrival_time=arrival, leader=leader,
                       mm=MultimodalState(*mm) if mm is not None else None)
        if grammar is None:
            self.scheduler.add(seq)
        request = self._requests[seq_id] = _Request(
            seq=seq, prompt=text, params=params,
            detokenizer=IncrementalDetokenizer(
                self.tokenizer, token_ids, params.skip_special_tokens,
                params.spaces_between_special_tokens,
            ) if detokenize else None,
            generator=request_generator(params, self.device),
            logprobs=[] if params.logprobs is not None else None,
            stream=stream,
            token_only=not detokenize,
            lazy=detokenize and not stream and not params.stop,
            plain_temperature=plain_temperature(params),
            stop_token_set=frozenset(params.stop_token_ids) | (
                frozenset() if params.ignore_eos else frozenset(self.eos_token_ids)),
            length_limit=min(self.max_model_len, len(token_ids) + max_tokens),
            prompt_token_ids=seq.prompt_token_ids,
            parent=parent, index=index, grammar=grammar,
        )
        if grammar is not None:
            self._compiling.append(request)
        return request

    def _check_images(self, token_ids: list[int], data: MultiModalData | None
                      ) -> tuple[MultiModalData, MultimodalLayout, torch.Tensor] | None:
        """The one door for images: the model takes them, their encoded rows match the
        prompt's placeholders, and an image that must be prefilled whole fits a step.
        Returns the encoded rows too: the prefill uses them (no second encode) and drops
        them once the prompt is computed."""
        is_multimodal = getattr(self.model, "is_multimodal", False)
        if data is None:
            return None
        if not is_multimodal:
            raise ValueError(f"images: {self.runner.hf_config.architectures[0]} is not a "
                             "vision-language model; it takes text only")
        layout = self.model.layout(token_ids, data.encoder_inputs)
        try:
            embeds = self.model.encode(data.encoder_inputs, self.device)  # [M, H]
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            raise ValueError(f"images: the model could not encode them: {err}") from None
        num_rows = int(embeds.shape[0])
        if num_rows != layout.num_rows:
            raise ValueError(f"images: {data.num_images} image(s) give {num_rows} embedding "
                             f"rows but the prompt holds {layout.num_rows} placeholder tokens; "
                             "the prompt must come from the model's processor")
        for start, end in layout.spans:
            if end - start > self.config.max_num_batched_tokens:
                raise ValueError(f"images: an image of {end - start} tokens must be prefilled "
                                 "in one step, more than max_num_batched_tokens="
                                 f"{self.config.max_num_batched_tokens}")
        return data, layout, embeds

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Aborts at any stage; its blocks are free when this returns. For n > 1 the
        request's id aborts every completion still running, a child's id that one alone
        (a front end whose stop string ended it); the output is the request's merged one."""
        request_id = str(request_id)
        parent = self._parents.get(request_id)
        if parent is not None:
            children = [self._requests.get(child_request_id(request_id, i))
                        for i in range(parent.n)]
            return self._merge(parent, {
                child.index: self._abort(child) for child in children if child is not None})
        request = self._requests.get(request_id)
        if request is None:
            return None
        output = self._abort(request)
        return output if request.parent is None else self._merge(request.parent,
                                                                 {request.index: output})

    def _abort(self, request: _Request) -> RequestOutput:
        del self._requests[request.seq.request_id]
        if request.grammar is not None:
            self._compiling.remove(request)
        self.scheduler.abort(request.seq.request_id)
        return self._output(request, finish_reason="abort")

    def _merge(self, parent: ParallelRequest, updates: dict[int, RequestOutput]
               ) -> RequestOutput:
        output = parent.merge(updates)
        if output.finished:
            self._parents.pop(parent.request_id, None)
        return output

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    @property
    def guided_stats(self) -> GuidedStats | None:
        """The grammar thread's host time (None until a structured request arrived)."""
        return self._guided.stats if self._guided is not None else None

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting + len(self._compiling),
            kv_cache_usage=bm.usage,
            num_preemptions=self.scheduler.num_preemptions_total,
            prefix_cache_queries=bm.prefix_cache_queries,
            prefix_cache_hits=bm.prefix_cache_hits,
        )

    # ---- one step -----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Runs one batch; returns an output for every request that produced tokens."""
        outputs: list[RequestOutput] = []
        # n > 1: each request's children's outputs of this step, and whether it streams
        children: dict[ParallelRequest, tuple[dict[int, RequestOutput], bool]] = {}
        if self._compiling:
            for request, output in self._admit_compiled():
                self._collect(request, output, outputs, children)
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            return self._merged(outputs, children)
        seqs, logits = self.runner.execute(scheduled.scheduled)
        self.scheduler.on_step_done(scheduled)
        if self._guided is not None:  # the last step's grammar work, done ahead
            self._collect_matchers()
        if not seqs:
            return self._merged(outputs, children)
        requests = [self._requests[s.request_id] for s in seqs]
        guided = [i for i, r in enumerate(requests) if r.matcher is not None]
        # Before the metadata, whose host-to-device copies may wait for the forward.
        bitmask = (self._guided.masks([requests[i].matcher for i in guided])
                   if guided else None)
        metadata = self._sampling_metadata(requests, logits)
        if guided:
            metadata = replace(metadata, token_bitmask=(
                torch.tensor(guided, dtype=torch.int64).to(logits.device, non_blocking=True),
                bitmask.to(logits.device, non_blocking=True)))
        sampled = self.sampler(logits, metadata)
        for request, token, logprob, top in zip(requests, sampled.token_ids,
                                                sampled.sampled_logprobs, sampled.logprobs):
            if request.grammar_error is not None:
                # Its grammar refused its last token (only a row whose every token was
                # masked gets there): its output so far matches the grammar, so it ends
                # here rather than go on unconstrained.
                logger.error("request %s: %s; aborting it", request.seq.request_id,
                             request.grammar_error)
                self._collect(request, self._abort(request), outputs, children)
                continue
            request.seq.append_token(token)
            request.cumulative_logprob += logprob
            if request.logprobs is not None:
                request.logprobs.append(top or {})
            if request.token_only:
                output = self._process_token_id(request, token)
            elif request.lazy:
                output = self._process_token_lazily(request, token)
            else:
                output = self._process_token(request)
            if output is not None:
                self._collect(request, output, outputs, children)
        if guided:  # the grammar thread feeds the tokens while this thread goes on
            self._advancing = [r for r in (requests[i] for i in guided)
                               if r.matcher is not None and r.seq.request_id in self._requests]
            self._guided.advance([(r.matcher, r.seq.last_token_id)
                                  for r in self._advancing])
        return self._merged(outputs, children)

    @staticmethod
    def _collect(request: _Request, output: RequestOutput, outputs: list[RequestOutput],
                 children: dict[ParallelRequest, tuple[dict[int, RequestOutput], bool]]
                 ) -> None:
        if request.parent is None:
            outputs.append(output)
        else:  # n > 1: one output for the request, with all its children's news
            children.setdefault(request.parent, ({}, request.stream))[0][request.index] = output

    def _merged(self, outputs: list[RequestOutput],
                children: dict[ParallelRequest, tuple[dict[int, RequestOutput], bool]]
                ) -> list[RequestOutput]:
        for parent, (updates, stream) in children.items():
            output = self._merge(parent, updates)
            # Not streamed (stream=False): reported once, when every child is done.
            if output.finished or stream:
                outputs.append(output)
        return outputs

    def _collect_matchers(self) -> None:
        """Waits for the grammar thread's feeding of the last step's tokens; a request whose
        token its grammar refused is marked to end."""
        fed, self._advancing = self._advancing, []
        for request, ok in zip(fed, self._guided.collect()):
            if not ok and request.matcher is not None:
                request.grammar_error = (f"the grammar refused token "
                                         f"{request.seq.last_token_id} "
                                         f"({request.matcher.get_error()})")
                request.matcher = None

    def _admit_compiled(self) -> list[tuple[_Request, RequestOutput]]:
        """Schedules the requests whose grammar is ready; ends those whose grammar failed
        (their outputs are returned). Waits briefly only when nothing else can run."""
        if not self.scheduler.has_unfinished:
            wait([self._compiling[0].grammar], timeout=_GRAMMAR_WAIT_S)
        ended: list[tuple[_Request, RequestOutput]] = []
        waiting: list[_Request] = []
        for request in self._compiling:
            grammar = request.grammar
            if not grammar.done():
                waiting.append(request)
                continue
            request.grammar = None
            error = grammar.exception()
            if error is None:
                matcher = grammar.result()  # the n completions share one compile
                request.matcher = matcher if request.index == 0 else matcher.deep_copy()
                self.scheduler.add(request.seq)
                continue
            logger.error("request %s: %s", request.seq.request_id, error)
            del self._requests[request.seq.request_id]
            ended.append((request, self._output(request, finish_reason="abort")))
        self._compiling = waiting
        return ended

    def _sampling_metadata(self, requests: list[_Request], logits: torch.Tensor
                           ) -> SamplingMetadata:
        """The batch's sampling inputs: cached tensors when every row samples with the same
        plain temperature (the common batch), else the general per-row build."""
        temperatures = {r.plain_temperature for r in requests}
        if len(temperatures) == 1 and None not in temperatures:
            return self.uniform_metadata.build(len(requests), temperatures.pop(),
                                               logits.shape[-1])
        # Token histories only for rows that read them (penalties, min_tokens): copying
        # every prompt every step would cost more than sampling.
        needs_ids = [r.params.has_penalties or r.params.min_tokens > 0 for r in requests]
        return SamplingMetadata.build(
            [r.params for r in requests],
            [r.seq.prompt_token_ids if need else [] for r, need in zip(requests, needs_ids)],
            [r.seq.output_token_ids if need else [] for r, need in zip(requests, needs_ids)],
            [r.generator for r in requests],
            self.eos_token_ids,
            logits.shape[-1],
            logits.device,
        )

    def _process_token(self, request: _Request) -> RequestOutput | None:
        seq, params = request.seq, request.params
        result = stop_checker.process_token(
            request.detokenizer, request.text, seq.output_view, params,
            self.eos_token_ids, seq.num_tokens, self.max_model_len,
        )
        request.text = result.text
        if result.finish_reason is None:
            return self._output(request) if request.stream else None
        return self._finish(request, result.finish_reason, result.stop_reason)

    def _process_token_lazily(self, request: _Request, token: int) -> RequestOutput | None:
        """Token-level stops only (no stop strings), text decoded once at the end: the
        same text process_token would have built token by token. The checks are
        stop_checker's is_stop_token and reaches_length with their per-request constants
        folded in at add_request (`stop_token_set`, `length_limit`)."""
        seq, params = request.seq, request.params
        num_tokens = len(seq.token_ids)
        if (request.stop_token_set and token in request.stop_token_set
                and num_tokens - seq.num_prompt_tokens >= params.min_tokens):
            detok = request.detokenizer
            request.text = detok.push(seq.output_token_ids[:-1]) + detok.flush()
            if params.include_stop_str_in_output:
                request.text += detok.push([token]) + detok.flush()
            reason = None if (not params.ignore_eos and token in self.eos_token_ids) else token
            return self._finish(request, "stop", reason)
        if num_tokens >= request.length_limit:
            detok = request.detokenizer
            request.text = detok.push(seq.output_token_ids) + detok.flush()
            return self._finish(request, "length", None)
        return None

    def _process_token_id(self, request: _Request, token: int) -> RequestOutput | None:
        """Token-level stops only and no text (detokenize=False): the same checks as
        _process_token_lazily, reported every step when streaming."""
        seq, params = request.seq, request.params
        num_tokens = len(seq.token_ids)
        if (request.stop_token_set and token in request.stop_token_set
                and num_tokens - seq.num_prompt_tokens >= params.min_tokens):
            reason = None if (not params.ignore_eos and token in self.eos_token_ids) else token
            return self._finish(request, "stop", reason)
        if num_tokens >= request.length_limit:
            return self._finish(request, "length", None)
        return self._output(request) if request.stream else None

    def _finish(self, request: _Request, finish_reason: str,
                stop_reason: int | str | None) -> RequestOutput:
        seq = request.seq
        seq.stop_reason = stop_reason
        self.scheduler.finish(seq, finish_reason)
        del self._requests[seq.request_id]
        return self._output(request, finish_reason=finish_reason)

    def _output(self, request: _Request, finish_reason: str | None = None) -> RequestOutput:
        seq, params = request.seq, request.params
        finished = finish_reason is not None
        text = stop_checker.emittable_text(request.text, params, finished)
        # Cumulative ids and logprobs as snapshots (copied only if read): O(1) per step.
        start, stop = seq.num_prompt_tokens, seq.num_tokens
        completion = CompletionOutput(
            index=0,
            text=text,
            token_ids=Snapshot(seq.token_ids, start, stop),
            cumulative_logprob=request.cumulative_logprob,
            logprobs=(Snapshot(request.logprobs, 0, len(request.logprobs))
                      if request.logprobs is not None else None),
            finish_reason=finish_reason,
            stop_reason=seq.stop_reason if finished else None,
            text_delta=text[request.reported_text:],
            token_ids_delta=seq.token_ids[start + request.reported_tokens:stop],
        )
        request.reported_text = len(text)
        request.reported_tokens = stop - start
        return RequestOutput(
            request_id=seq.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=[completion],
            finished=finished,
            num_cached_tokens=seq.num_cached_tokens,
        )


def _with_max_tokens(params: SamplingParams, max_tokens: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, max_tokens=max_tokens)
