"""The model runner: owns the model and its paged KV cache, and turns a scheduled step into
logits.

Per step it builds one flat batch (decodes and prefill chunks mixed): input_ids and
positions [N], and an AttentionMetadata (slot_mapping, query_start_loc, seq_lens,
block_tables) that it passes explicitly to the model's forward. The batch is built on the
host with numpy over incremental block tables (engine/input_batch.py) and reaches the
device in one copy. Only the rows whose
sequence finishes its uncomputed tokens this step go through the LM head (one row per such
sequence: its last token), so a prefill chunk that does not end the prompt costs no logits.

Tensor parallelism: rank 0's runner (with `mirror`, its TensorParallelGroup) sends each
step's host arrays to the worker ranks, whose runners (same class, their own shard and KV
cache of their KV heads) run the same forward through `run_host`; the split layers'
collectives keep the ranks in step and only rank 0 reads the logits. CUDA graphs are off at
tensor_parallel_size > 1 (decode runs eagerly): capturing collectives is left to the
multi-GPU work.

KV-cache sizing: on CUDA, a profiling forward of a full token budget measures peak memory
and the cache gets gpu_memory_utilization of the card minus that; on CPU it gets
kv_cache_memory_bytes (default: 1 GiB, capped at what max_num_seqs full-length sequences
need). Either way it must hold at least one max_model_len sequence, so the scheduler can
always make progress.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from tritonforge.engine.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from tritonforge.engine.cuda_graphs import DecodeGraphs
from tritonforge.engine.input_batch import HostInputs, InputBatch
from tritonforge.engine.multimodal_batch import multimodal_step
from tritonforge.engine.sequence import Sequence
from tritonforge.models.attention_metadata import AttentionMetadata
from tritonforge.models.layers.attention import bind_kv_cache
from tritonforge.models.layers.parallel_state import SINGLE, TPGroup, all_reduce_min
from tritonforge.models.registry import kv_cache_shape
from tritonforge.models.transformers_multimodal import MultimodalStep

if TYPE_CHECKING:
    from tritonforge.engine.tensor_parallel import TensorParallelGroup

logger = logging.getLogger(__name__)


@dataclass
class StepInputs:
    """A step's inputs on the runner's device."""

    input_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    attn_metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [S] int64: rows whose logits are sampled
    sampled_seqs: list[Sequence]  # the S sequences, in row order
    mm: MultimodalStep | None = None  # a vision-language model's image rows this step


_ALIGN = 16  # int64 elements: 128 bytes


def to_device(host: HostInputs, device: torch.device) -> StepInputs:
    """Packs every integer array of the step into one int64 host buffer, copies it to
    `device` at once and takes the tensors as views (int32 ones converted there).

    Why one copy: each host-to-device copy costs the host a driver call, and a step has
    seven arrays. The buffer is fresh pageable memory each step: a non_blocking copy from
    pageable memory is staged by the driver before the call returns, so nothing the host
    does later can race with it (a reused pinned buffer would need an event per step). On
    the CPU the "copy" is the buffer itself.
    """
    parts = (host.input_ids, host.positions, host.slot_mapping, host.logits_indices,
             host.query_start_loc, host.seq_lens, host.block_tables.reshape(-1))
    # Each part starts on a 128-byte boundary, as a tensor of its own would: Triton
    # specializes kernels on pointer alignment, so a misaligned view would cost a compile
    # and slower loads.
    starts = np.cumsum([0] + [-(-p.size // _ALIGN) * _ALIGN for p in parts])
    packed = np.zeros(int(starts[-1]), dtype=np.int64)
    for part, start in zip(parts, starts):
        packed[start:start + part.size] = part
    flat = torch.from_numpy(packed).to(device, non_blocking=True)
    views = [flat[start:start + part.size] for part, start in zip(parts, starts.tolist())]
    input_ids, positions, slot_mapping, logits_indices = views[:4]
    query_start_loc, seq_lens, block_tables = (v.to(torch.int32) for v in views[4:])
    meta = AttentionMetadata(
        slot_mapping=slot_mapping,
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        block_tables=block_tables.view(host.block_tables.shape),
        max_query_len=host.max_query_len,
        max_seq_len=host.max_seq_len,
        block_size=host.block_size,
        is_decode_only=host.is_decode_only,
    )
    return StepInputs(input_ids, positions, meta, logits_indices, host.sampled_seqs)


class ModelRunner:
    def __init__(self, config: EngineConfig, model: torch.nn.Module, hf_config: object,
                 device: torch.device, dtype: torch.dtype, max_model_len: int,
                 tp: TPGroup = SINGLE, mirror: TensorParallelGroup | None = None) -> None:
        self.config = config
        self.tp = tp  # the group `model` was built for
        self.mirror = mirror  # rank 0 of a group: sends each step to the other ranks
        self.model = model
        self.hf_config = hf_config
        self.device = device
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.block_size = config.block_size
        # v_head_dim: the V cache's width, head_dim for every model but MLA's (0: its K cache
        # holds the latent that serves as the values too).
        (self.num_layers, self.num_kv_heads, self.head_dim,
         self.v_head_dim) = kv_cache_shape(hf_config, tp.size)
        # Every rank holds the same block ids: the group takes the smallest rank's count.
        self.num_blocks = all_reduce_min(self._num_kv_blocks(), tp, device)
        self.kv_caches = self._allocate_kv_cache(self.num_blocks)
        bind_kv_cache(model, self.kv_caches)
        self.input_batch = InputBatch(config.max_num_seqs, max_model_len, self.block_size)
        self.graphs: DecodeGraphs | None = None
        # A model may say its forward cannot be captured (DeepSeek: the MLA reference reads
        # seq_lens on the host), rather than fail a capture attempt.
        if (self.device.type == "cuda" and not config.enforce_eager and tp.size == 1
                and getattr(model, "supports_cuda_graphs", True)):
            self.graphs = DecodeGraphs(model, config.max_num_seqs, max_model_len,
                                       self.block_size, self.device)
            try:
                self.graphs.capture()
                logger.info("%s: CUDA graphs captured for decode batch sizes %s",
                            type(model).__name__, self.graphs.sizes)
            except Exception as err:  # noqa: BLE001 - a model with host syncs in forward
                # A model whose forward cannot be captured still runs, eagerly.
                logger.warning("CUDA graph capture failed (%s); decode runs eagerly", err)
                self.graphs = None

    # ---- KV cache ---------------------------------------------------------------------
    @property
    def block_bytes(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        width = self.head_dim + self.v_head_dim  # K and V of one head of one token
        return self.num_layers * self.block_size * self.num_kv_heads * width * element

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        needed_one = -(-self.max_model_len // self.block_size)
        if cfg.num_kv_blocks is not None:
            num_blocks = cfg.num_kv_blocks
        elif cfg.kv_cache_memory_bytes is not None:
            num_blocks = cfg.kv_cache_memory_bytes // self.block_bytes
        elif self.device.type == "cuda":
            num_blocks = self._profile_cuda_blocks()
        else:
            wanted = cfg.max_num_seqs * needed_one
            num_blocks = min(wanted, DEFAULT_CPU_KV_CACHE_BYTES // self.block_bytes)
        if num_blocks < needed_one:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks of {self.block_size} tokens "
                f"({num_blocks * self.block_size} tokens), fewer than one max_model_len="
                f"{self.max_model_len} sequence needs ({needed_one} blocks); lower max_model_len "
                "or give the cache more memory (gpu_memory_utilization / kv_cache_memory_bytes)"
            )
        return int(num_blocks)

    def _allocate_kv_cache(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # Zeroed, not empty: attention never reads past seq_lens, but garbage NaNs in an
        # unread slot must not be able to leak through a 0 * NaN in a reference kernel.
        shape = (num_blocks, self.block_size, self.num_kv_heads)
        return [
            (torch.zeros(*shape, self.head_dim, dtype=self.dtype, device=self.device),
             torch.zeros(*shape, self.v_head_dim, dtype=self.dtype, device=self.device))
            for _ in range(self.num_layers)
        ]

    @torch.inference_mode()
    def _profile_cuda_blocks(self) -> int:
        """What this engine may still take: gpu_memory_utilization of the card, minus its
        weights and the activation peak of the largest step (measured), capped by what is
        free (other processes and engines on the card keep theirs)."""
        n = min(self.config.max_num_batched_tokens, self.max_model_len)
        scratch_blocks = -(-n // self.block_size)
        bind_kv_cache(self.model, self._allocate_kv_cache(scratch_blocks))
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        meta = AttentionMetadata.for_prompts([n], self.block_size).to(self.device)
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        hidden = self.model(ids, torch.arange(n, device=self.device), meta)
        rows = min(self.config.max_num_seqs, n)
        self.model.compute_logits(hidden[:rows])
        torch.cuda.synchronize(self.device)
        activation = torch.cuda.max_memory_allocated(self.device) - before
        del hidden
        weights = sum(t.numel() * t.element_size()
                      for t in itertools.chain(self.model.parameters(), self.model.buffers()))
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        budget = total * self.config.gpu_memory_utilization - weights - activation
        # Keep room for the activations (and CUDA graphs) beside whatever else is resident.
        budget = min(budget, free - activation - (256 << 20))
        return max(int(budget // self.block_bytes), 0)

    def kv_cache_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    # ---- one step -----------------------------------------------------------------------
    def prepare(self, scheduled: list[tuple[Sequence, int]]) -> StepInputs:
        """The step's inputs on the runner's device: built on the host with numpy
        (InputBatch), then moved in ONE host-to-device copy (`to_device`)."""
        host = self.input_batch.build(scheduled)
        mm = None
        if getattr(self.model, "is_multimodal", False):  # before the copy: may shift positions
            mm = multimodal_step(self.model, host, scheduled, self.device)
        inputs = to_device(host, self.device)
        inputs.mm = mm
        return inputs

    @torch.inference_mode()  # prepare too: a vision-language step runs its vision tower there
    def execute(self, scheduled: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor]:
        """Runs one step; returns the sequences to sample and their logits [S, V] float32."""
        if self.mirror is None:
            return self._forward(self.prepare(scheduled))
        host = self.input_batch.build(scheduled)
        # The workers need the arrays, not the Sequence objects (only rank 0 samples).
        self.mirror.broadcast("run", dataclasses.replace(host, sampled_seqs=[]))
        try:
            return self._forward(to_device(host, self.device))
        except Exception as err:  # a rank's failure surfaces here as a failed collective
            raise self.mirror.explain(err) from err

    def run_host(self, host: HostInputs) -> None:
        """A worker rank's step: rank 0's host arrays through this rank's shard."""
        self._forward(to_device(host, self.device))

    @torch.inference_mode()
    def _forward(self, inputs: StepInputs) -> tuple[list[Sequence], torch.Tensor]:
        meta = inputs.attn_metadata
        if (self.graphs is not None and meta.is_decode_only
                and self.graphs.bucket(meta.num_seqs) is not None):
            hidden = self.graphs.run(inputs.input_ids, inputs.positions, meta)
        elif inputs.mm is not None:
            hidden = self.model(inputs.input_ids, inputs.positions, meta, inputs.mm)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, meta)
        # By rows, not sampled_seqs: a worker has the rows (and joins the LM head's gather)
        # but not the sequences.
        if inputs.logits_indices.numel() == 0:
            return [], torch.empty(0, 0)
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        return inputs.sampled_seqs, logits.float()
