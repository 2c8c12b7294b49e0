"""The incremental, vectorized step inputs (InputBatch + to_device) equal a straightforward
per-token build on random step sequences: tables that grow, get replaced (preemption,
re-admission), sequences that leave and join, prefill chunks mixed with decodes."""

from __future__ import annotations

import random

import torch
from tritonforge.engine.input_batch import InputBatch
from tritonforge.engine.model_runner import to_device
from tritonforge.engine.sequence import Sequence

BLOCK_SIZE = 16


def reference(scheduled: list[tuple[Sequence, int]], block_size: int) -> dict[str, object]:
    """The per-token build the runner used before InputBatch (the spec)."""
    input_ids, positions, slots, starts, seq_lens, logits_indices, sampled = \
        [], [], [], [0], [], [], []
    for seq, n in scheduled:
        first, last = seq.num_computed_tokens, seq.num_computed_tokens + n
        input_ids += seq.token_ids[first:last]
        positions += range(first, last)
        table = seq.block_table
        slots += [table[p // block_size] * block_size + p % block_size
                  for p in range(first, last)]
        starts.append(starts[-1] + n)
        seq_lens.append(last)
        if last == seq.num_tokens:
            logits_indices.append(starts[-1] - 1)
            sampled.append(seq)
    width = max((len(seq.block_table) for seq, _ in scheduled), default=1)
    block_tables = torch.zeros(len(scheduled), width, dtype=torch.int32)
    for b, (seq, _) in enumerate(scheduled):
        block_tables[b, :len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.int32)
    query_lens = [n for _, n in scheduled]
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.int64),
        "positions": torch.tensor(positions, dtype=torch.int64),
        "slot_mapping": torch.tensor(slots, dtype=torch.int64),
        "query_start_loc": torch.tensor(starts, dtype=torch.int32),
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32),
        "block_tables": block_tables,
        "logits_indices": torch.tensor(logits_indices, dtype=torch.int64),
        "sampled": sampled,
        "max_query_len": max(query_lens, default=0),
        "max_seq_len": max(seq_lens, default=0),
        "is_decode_only": all(n == 1 for n in query_lens),
    }


def _assert_equal(got, want) -> None:
    meta = got.attn_metadata
    pairs = {"input_ids": got.input_ids, "positions": got.positions,
             "slot_mapping": meta.slot_mapping, "query_start_loc": meta.query_start_loc,
             "seq_lens": meta.seq_lens, "block_tables": meta.block_tables,
             "logits_indices": got.logits_indices}
    for name, tensor in pairs.items():
        assert tensor.dtype == want[name].dtype, name
        assert torch.equal(tensor, want[name]), name
    assert got.sampled_seqs == want["sampled"]
    base = got.input_ids.data_ptr()  # the packed buffer's start: every part 128-byte aligned
    for view in (got.positions, meta.slot_mapping, got.logits_indices):
        assert view.numel() == 0 or (view.data_ptr() - base) % 128 == 0
    assert (meta.max_query_len, meta.max_seq_len, meta.is_decode_only, meta.block_size) == (
        want["max_query_len"], want["max_seq_len"], want["is_decode_only"], BLOCK_SIZE)


class _World:
    """Random sequences whose block tables evolve the way BlockManager changes them: grown
    in place by appends, or replaced by a new list (free then re-admission)."""

    def __init__(self, rng: random.Random, max_num_seqs: int) -> None:
        self.rng, self.max_num_seqs = rng, max_num_seqs
        self.seqs: list[Sequence] = []

    def _blocks(self, n: int) -> list[int]:
        return [self.rng.randrange(10_000) for _ in range(n)]

    def new_seq(self) -> Sequence:
        prompt = [self.rng.randrange(1000) for _ in range(self.rng.randint(1, 90))]
        return Sequence(str(self.rng.random()), prompt, None)

    def step(self) -> list[tuple[Sequence, int]]:
        rng = self.rng
        self.seqs = [s for s in self.seqs if rng.random() > 0.1]  # some finish
        while len(self.seqs) < self.max_num_seqs and rng.random() < 0.5:
            self.seqs.append(self.new_seq())
        scheduled = []
        for seq in self.seqs:
            if rng.random() < 0.15:
                continue  # not scheduled this step (no budget)
            if rng.random() < 0.05:  # preempted and re-admitted: a new table, recompute
                seq.block_table = []
                seq.num_computed_tokens = 0
            uncomputed = seq.num_tokens - seq.num_computed_tokens
            n = 1 if uncomputed == 1 else rng.randint(1, uncomputed)
            need = -(-(seq.num_computed_tokens + n) // BLOCK_SIZE)
            seq.block_table.extend(self._blocks(need - len(seq.block_table)))
            scheduled.append((seq, n))
        return scheduled

    def done(self, scheduled: list[tuple[Sequence, int]]) -> None:
        for seq, n in scheduled:
            seq.num_computed_tokens += n
            if seq.num_computed_tokens == seq.num_tokens:
                seq.append_token(self.rng.randrange(1000))


def test_incremental_inputs_equal_the_per_token_build_on_random_steps():
    rng = random.Random(0)
    max_num_seqs = 24
    batch = InputBatch(max_num_seqs, max_model_len=4096, block_size=BLOCK_SIZE)
    world = _World(rng, max_num_seqs)
    decode_only_steps = 0
    for _ in range(300):
        scheduled = world.step()
        want = reference(scheduled, BLOCK_SIZE)
        _assert_equal(to_device(batch.build(scheduled), torch.device("cpu")), want)
        decode_only_steps += bool(scheduled) and want["is_decode_only"]
        world.done(scheduled)
    assert decode_only_steps > 10  # both branches (decode-only and mixed) were compared


def test_a_row_reused_by_a_shorter_table_is_zero_padded_like_a_fresh_one():
    batch = InputBatch(1, max_model_len=4096, block_size=BLOCK_SIZE)
    long = Sequence("long", list(range(100)), None)
    long.block_table = list(range(1, 8))
    batch.build([(long, 100)])
    short = Sequence("short", [1, 2, 3], None)
    short.block_table = [9]
    got = batch.build([(short, 3)])
    assert got.block_tables.tolist() == [[9]]
    assert batch.table[0].tolist()[:8] == [9, 0, 0, 0, 0, 0, 0, 0]
