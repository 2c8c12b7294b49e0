"""One step's flat-batch inputs, built with numpy from persistent per-sequence block-table rows.

Why: the straightforward build walks every token of every scheduled sequence in Python and
creates one small tensor per block-table row; at 256 running sequences that was most of
the host time of a decode step. Here the Python work per step is one pass over the
scheduled sequences (their counters and new token ids); positions, slots, query offsets and
the batch's block tables are numpy expressions over whole arrays.

Block tables are incremental: each scheduled sequence owns a row of a persistent
[max_num_seqs, max_blocks_per_seq] int32 table, and a step writes only the blocks
appended to its `block_table` since the last step. A sequence's table only grows in place
(BlockManager.allocate_slots appends) or is replaced by a new list (free, match_prefix), so
"same list object, written prefix" is exactly what the row already holds; any other state
rewrites the row. A sequence not scheduled in a step gives its row back (finished,
aborted, preempted or only waiting for budget); if it returns it is written afresh.

Layout of the result equals the straightforward build's (tests/engine/test_input_batch.py
checks it on random batches): rows in scheduled order, block tables zero-padded to the
widest table of the step, slots `block * block_size + offset`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from tritonforge.engine.sequence import Sequence


@dataclass
class HostInputs:
    """A step's inputs as host numpy arrays (B sequences, N tokens, S sampled rows)."""

    input_ids: np.ndarray  # [N] int64
    positions: np.ndarray  # [N] int64
    slot_mapping: np.ndarray  # [N] int64
    query_start_loc: np.ndarray  # [B + 1] int32
    seq_lens: np.ndarray  # [B] int32, KV length after this step
    block_tables: np.ndarray  # [B, W] int32, W = the widest table this step (>= 1)
    logits_indices: np.ndarray  # [S] int64: the last query row of each sampled sequence
    sampled_seqs: list[Sequence]  # the S sequences, in row order
    max_query_len: int
    max_seq_len: int
    block_size: int
    is_decode_only: bool


class InputBatch:
    def __init__(self, max_num_seqs: int, max_model_len: int, block_size: int) -> None:
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.table = np.zeros((max_num_seqs, self.max_blocks), dtype=np.int32)
        self._row_of: dict[int, int] = {}  # seq_id -> row
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))  # pop() takes the lowest
        # Per row: the block_table list object written and how many of its ids are there.
        self._source: list[list[int] | None] = [None] * max_num_seqs
        self._written = [0] * max_num_seqs

    def _rows(self, seqs: list[Sequence]) -> np.ndarray:
        """Row per sequence (in order), with each row's block table brought up to date."""
        wanted = {seq.seq_id for seq in seqs}
        for seq_id in [s for s in self._row_of if s not in wanted]:
            row = self._row_of.pop(seq_id)
            self._source[row] = None
            self._free_rows.append(row)
        rows = np.empty(len(seqs), dtype=np.int64)
        for b, seq in enumerate(seqs):
            row = self._row_of.get(seq.seq_id)
            if row is None:
                row = self._row_of[seq.seq_id] = self._free_rows.pop()
            rows[b] = row
            table, written = seq.block_table, self._written[row]
            if self._source[row] is table and len(table) >= written:
                if len(table) > written:  # appended since the last step
                    self.table[row, written:len(table)] = table[written:]
            else:  # a new owner, or the sequence got a new table (freed, then re-admitted)
                self.table[row, :len(table)] = table
                if written > len(table):  # clear what a longer previous table left
                    self.table[row, len(table):written] = 0
                self._source[row] = table
            self._written[row] = len(table)
        return rows

    def build(self, scheduled: list[tuple[Sequence, int]]) -> HostInputs:
        """scheduled: (sequence, tokens to compute from its num_computed_tokens), B of them."""
        num_seqs = len(scheduled)
        seqs = [seq for seq, _ in scheduled]
        query_lens = np.fromiter((n for _, n in scheduled), dtype=np.int64, count=num_seqs)
        computed = np.fromiter((s.num_computed_tokens for s in seqs), dtype=np.int64,
                               count=num_seqs)
        num_tokens = np.fromiter((len(s.token_ids) for s in seqs), dtype=np.int64,
                                 count=num_seqs)
        rows = self._rows(seqs)
        seq_lens = computed + query_lens
        starts = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(query_lens, out=starts[1:])
        total = int(starts[-1])
        is_decode_only = total == num_seqs
        if is_decode_only:  # one token per sequence: the newest, at position num_computed
            positions = computed
            input_ids = np.fromiter((s.token_ids[c] for s, c in zip(seqs, computed.tolist())),
                                    dtype=np.int64, count=num_seqs)
            owner = np.arange(num_seqs)
        else:
            owner = np.repeat(np.arange(num_seqs), query_lens)  # [N] sequence of each row
            positions = np.arange(total, dtype=np.int64) + np.repeat(computed - starts[:-1],
                                                                     query_lens)
            input_ids = np.fromiter(
                itertools.chain.from_iterable(
                    s.token_ids[c:c + n] for s, c, n in zip(seqs, computed.tolist(),
                                                           query_lens.tolist())),
                dtype=np.int64, count=total)
        bs = self.block_size
        blocks = self.table[rows[owner], positions // bs].astype(np.int64)
        slot_mapping = blocks * bs + positions % bs
        width = max((len(s.block_table) for s in seqs), default=1)
        block_tables = self.table[rows, :width]  # fancy indexing copies: later writes are safe
        sampled = np.flatnonzero(seq_lens == num_tokens)
        return HostInputs(
            input_ids=input_ids,
            positions=positions,
            slot_mapping=slot_mapping,
            query_start_loc=starts.astype(np.int32),
            seq_lens=seq_lens.astype(np.int32),
            block_tables=block_tables,
            logits_indices=starts[1:][sampled] - 1,
            sampled_seqs=[seqs[i] for i in sampled.tolist()],
            max_query_len=int(query_lens.max()) if num_seqs else 0,
            max_seq_len=int(seq_lens.max()) if num_seqs else 0,
            block_size=bs,
            is_decode_only=is_decode_only,
        )
