"""The attention metadata of one engine step, passed explicitly to every model forward.

A step is a flat batch of N new tokens from B sequences (prefill chunks and decodes mixed,
prefills may start after cached prefix blocks). Sequence b owns query rows
`query_start_loc[b]:query_start_loc[b+1]`; after this step its KV cache holds `seq_lens[b]`
tokens, of which the last `query_len(b)` are the new ones (their K/V are written to
`slot_mapping` before attention runs). Query row i of sequence b sits at position
`seq_lens[b] - query_len(b) + i` and attends causally to cache positions <= that one.

A slot is `block_id * block_size + offset`; `block_tables[b, j]` is the physical block of
sequence b's j-th logical block (rows padded with 0 past the sequence's blocks, never read).
A slot of -1 means "do not store" (padding rows of CUDA-graph batches).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [N] int64
    query_start_loc: torch.Tensor  # [B + 1] int32, cumulative query lengths
    seq_lens: torch.Tensor  # [B] int32, KV length of each sequence after this step
    block_tables: torch.Tensor  # [B, max_blocks_per_seq] int32
    max_query_len: int
    max_seq_len: int
    block_size: int
    # True when every sequence has exactly one query token (pure decode step): kernels may
    # take the decode path and the runner may replay a CUDA graph.
    is_decode_only: bool = False

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    def query_lens(self) -> torch.Tensor:
        # [B] int32
        return self.query_start_loc[1:] - self.query_start_loc[:-1]

    def to(self, device: torch.device | str) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping.to(device, non_blocking=True),
            query_start_loc=self.query_start_loc.to(device, non_blocking=True),
            seq_lens=self.seq_lens.to(device, non_blocking=True),
            block_tables=self.block_tables.to(device, non_blocking=True),
            max_query_len=self.max_query_len,
            max_seq_len=self.max_seq_len,
            block_size=self.block_size,
            is_decode_only=self.is_decode_only,
        )

    @classmethod
    def for_prompts(
        cls, prompt_lens: list[int], block_size: int, num_blocks_offset: int = 0
    ) -> AttentionMetadata:
        """Metadata for whole prompts laid out in consecutive fresh blocks (tests, profiling
        runs): sequence b gets blocks after those of sequences < b, from num_blocks_offset."""
        blocks_per_seq = [-(-n // block_size) for n in prompt_lens]
        max_blocks = max(blocks_per_seq, default=0)
        block_tables = torch.zeros(len(prompt_lens), max(max_blocks, 1), dtype=torch.int32)
        slots: list[int] = []
        next_block = num_blocks_offset
        for b, (n, nb) in enumerate(zip(prompt_lens, blocks_per_seq)):
            table = list(range(next_block, next_block + nb))
            block_tables[b, :nb] = torch.tensor(table, dtype=torch.int32)
            slots += [table[i // block_size] * block_size + i % block_size for i in range(n)]
            next_block += nb
        starts = [0]
        for n in prompt_lens:
            starts.append(starts[-1] + n)
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(prompt_lens, dtype=torch.int32),
            block_tables=block_tables,
            max_query_len=max(prompt_lens, default=0),
            max_seq_len=max(prompt_lens, default=0),
            block_size=block_size,
            is_decode_only=all(n == 1 for n in prompt_lens),
        )
