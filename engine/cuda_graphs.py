"""CUDA graphs for decode steps: one captured forward per batch-size bucket.

A decode step launches a few hundred small kernels whose CPU launch cost exceeds their GPU
time at small batches; replaying a captured graph launches them all at once. Graphs need
static shapes and addresses, so every input lives in a static buffer sized for the largest
bucket: a step with B sequences copies its inputs into the first B rows, pads the bucket
with rows that store nothing (slot -1) and attend to one cached token, replays, and reads
the first B rows of the static hidden output. The attention launch configuration depends
only on the bucket (max_seq_len is pinned to max_model_len at capture), never on the
step's data, so one graph serves every decode step of its size. Logits are computed
outside the graph: they are one large matmul, and keeping them out saves a
[bucket, vocab] buffer per graph.
"""

from __future__ import annotations

import torch
from tritonforge.models.attention_metadata import AttentionMetadata


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Buckets as vLLM picks them: 1, 2, 4, 8, then every 16 up to max_num_seqs."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16))
    if sizes[-1] != max_num_seqs and max_num_seqs > 8:
        sizes.append(max_num_seqs)
    return sizes


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, max_num_seqs: int, max_model_len: int,
                 block_size: int, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.sizes = capture_sizes(max_num_seqs)
        max_bs = self.sizes[-1]
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_bs, max_blocks, dtype=torch.int32, device=device)
        # Every decode row holds one query token, so query_start_loc never changes.
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    def _metadata(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            max_query_len=1,
            max_seq_len=self.max_model_len,
            block_size=self.block_size,
            is_decode_only=True,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures every bucket, largest first, sharing one memory pool."""
        for bs in reversed(self.sizes):
            meta = self._metadata(bs)
            # Warm up outside the graph: Triton compiles and autotunes on first launch.
            for _ in range(2):
                self.model(self.input_ids[:bs], self.positions[:bs], meta)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[bs] = self.model(self.input_ids[:bs], self.positions[:bs], meta)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)

    def bucket(self, num_seqs: int) -> int | None:
        for bs in self.sizes:
            if bs >= num_seqs:
                return bs
        return None

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            meta: AttentionMetadata) -> torch.Tensor:
        """hidden [B, H] for a decode step of B sequences (host or device tensors)."""
        num_seqs = meta.num_seqs
        bs = self.bucket(num_seqs)
        assert bs is not None and meta.is_decode_only
        self.input_ids[:num_seqs].copy_(input_ids, non_blocking=True)
        self.positions[:num_seqs].copy_(positions, non_blocking=True)
        self.slot_mapping[:num_seqs].copy_(meta.slot_mapping, non_blocking=True)
        self.slot_mapping[num_seqs:bs].fill_(-1)
        self.seq_lens[:num_seqs].copy_(meta.seq_lens, non_blocking=True)
        self.seq_lens[num_seqs:bs].fill_(1)
        width = meta.block_tables.shape[1]
        self.block_tables[:num_seqs, :width].copy_(meta.block_tables, non_blocking=True)
        self.block_tables[num_seqs:bs].zero_()
        self.graphs[bs].replay()
        return self.outputs[bs][:num_seqs]
