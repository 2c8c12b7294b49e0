"""The paged KV block manager: ref counts match the tables, nothing leaks, allocation is
all-or-nothing, prefix-cache hits are exact (a hash collision never reuses wrong K/V), at
least one token is always left to compute, and LRU eviction drops the least recently
freed (tail-first) blocks.
"""

from __future__ import annotations

import itertools

import pytest
from tritonforge.engine import block_manager as bm_module
from tritonforge.engine.block_manager import BlockManager, hash_block_tokens
from tritonforge.engine.sequence import Sequence

BS = 16
_ids = itertools.count()


def seq_of(tokens: list[int]) -> Sequence:
    return Sequence(f"r{next(_ids)}", list(tokens), None)


def run_prefill(bm: BlockManager, seq: Sequence) -> int:
    """What the scheduler does for one whole-prompt step: match, allocate, compute, cache.
    Returns the tokens served from the cache."""
    cached = bm.match_prefix(seq)
    assert bm.allocate_slots(seq, seq.num_uncomputed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)
    return cached


def tokens(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


@pytest.mark.parametrize("block_size", [0, 8, 17, 24, -16, 16.0, True])
def test_block_size_must_be_positive_multiple_of_16(block_size: object) -> None:
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(num_blocks=4, block_size=block_size)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_blocks", [0, -1, 2.5, None])
def test_num_blocks_must_be_at_least_one(num_blocks: object) -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(num_blocks=num_blocks, block_size=16)  # type: ignore[arg-type]


def test_any_multiple_of_16_is_a_valid_block_size() -> None:
    for block_size in (16, 32, 48, 256):
        bm = BlockManager(num_blocks=3, block_size=block_size)
        seq = seq_of(tokens(0, block_size + 1))
        assert bm.allocate_slots(seq, seq.num_tokens)
        assert len(seq.block_table) == 2


def test_allocation_is_all_or_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    holder = seq_of(tokens(0, 2 * BS))
    assert bm.allocate_slots(holder, 2 * BS)
    seq = seq_of(tokens(100, 3 * BS))
    assert not bm.allocate_slots(seq, 3 * BS)  # needs 3, 2 free
    assert seq.block_table == [] and bm.num_free_blocks == 2
    assert bm.allocate_slots(seq, 2 * BS)
    assert bm.num_free_blocks == 0
    bm.check_invariants([holder, seq])


def test_allocation_grows_the_table_only_past_block_boundaries() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    seq = seq_of(tokens(0, 10))
    assert bm.allocate_slots(seq, 10) and len(seq.block_table) == 1
    seq.num_computed_tokens = 10
    assert bm.allocate_slots(seq, 6) and len(seq.block_table) == 1  # fills block 0 exactly
    seq.num_computed_tokens = 16
    assert bm.allocate_slots(seq, 1) and len(seq.block_table) == 2


def test_free_returns_every_block_and_usage_ignores_cached_free_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    a, b = seq_of(tokens(0, 3 * BS + 5)), seq_of(tokens(500, 2 * BS))
    run_prefill(bm, a)
    run_prefill(bm, b)
    assert bm.num_used_blocks == 6 and bm.usage == pytest.approx(6 / 8)
    bm.check_invariants([a, b])
    bm.free(a)
    bm.free(b)
    assert a.block_table == [] and a.block_hashes == []
    assert bm.num_free_blocks == 8 and bm.num_used_blocks == 0
    assert bm.usage == 0.0
    assert len(bm.cached) == 5  # computed full blocks register, even a last one
    bm.check_invariants([a, b])


def test_shared_prefix_of_three_full_blocks_hits_48_tokens_and_shares_blocks() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    shared = tokens(1000, 3 * BS)
    a = seq_of(shared + tokens(1, 10))
    assert run_prefill(bm, a) == 0
    b = seq_of(shared + tokens(5000, 20))
    hits_before = bm.prefix_cache_hits
    assert bm.match_prefix(b) == 48
    assert bm.prefix_cache_hits == hits_before + 48
    assert bm.prefix_cache_queries == a.num_tokens + b.num_tokens
    assert b.block_table == a.block_table[:3]
    assert b.num_cached_tokens == b.num_computed_tokens == 48
    assert b.block_hashes == a.block_hashes[:3]
    assert all(bm.blocks[i].ref_count == 2 for i in a.block_table[:3])
    assert bm.allocate_slots(b, b.num_uncomputed_tokens)
    bm.check_invariants([a, b])


def test_hit_on_a_cached_free_block_takes_it_out_of_the_free_queue() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = seq_of(tokens(0, 2 * BS + 1))
    run_prefill(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4
    b = seq_of(tokens(0, 2 * BS + 1))
    assert bm.match_prefix(b) == 2 * BS
    assert bm.num_free_blocks == 2 and all(i not in bm.free_queue for i in b.block_table)
    bm.check_invariants([b])


def test_hash_collision_never_reuses_blocks_with_different_tokens(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bm_module, "hash_block_tokens", lambda parent, ids: 0)
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = seq_of(tokens(0, 2 * BS + 1))
    run_prefill(bm, a)
    assert bm.cached == {0: a.block_table[0]}  # every block collides: only the first registers
    other = seq_of(tokens(700, 2 * BS + 1))
    assert bm.match_prefix(other) == 0
    assert other.block_table == []
    bm.check_invariants([a, other])


def test_hash_collision_never_serves_a_block_at_another_position(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Same tokens, different parent: block 1 of `b` must not reuse `a`'s block 0 (its K/V
    # was computed at positions 0..15, b needs 16..31).
    monkeypatch.setattr(bm_module, "hash_block_tokens", lambda parent, ids: 7)
    bm = BlockManager(num_blocks=16, block_size=BS)
    block = tokens(300, BS)
    a = seq_of(block + [1])
    run_prefill(bm, a)
    b = seq_of(block + block + [1])
    assert bm.match_prefix(b) == BS
    bm.check_invariants([a, b])


def test_prefix_hit_is_exact_even_when_different_first_blocks_collide(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Every first block hashes alike; deeper blocks hash their parent's hash honestly. A
    # block computed after prefix `a` must not serve a sequence whose first block is `b`,
    # even once `b` owns the hash `a` had and the child's parent hash still matches.
    honest = bm_module.hash_block_tokens
    monkeypatch.setattr(bm_module, "hash_block_tokens",
                        lambda parent, ids: 1 if parent is None else honest(parent, ids))
    bm = BlockManager(num_blocks=8, block_size=BS)
    a, b, t = tokens(0, BS), tokens(100, BS), tokens(200, BS)
    first, second = seq_of(a + t + [1]), seq_of(a + t + [1])
    for seq in (first, second):
        bm.match_prefix(seq)
        assert bm.allocate_slots(seq, seq.num_tokens)
    first.num_computed_tokens = BS  # a chunk: only `a` is computed and registered
    bm.cache_full_blocks(first)
    second.num_computed_tokens = second.num_tokens  # registers second's `t` under a's id
    bm.cache_full_blocks(second)
    bm.free(first)  # a's registered block is now free, second still holds its `t`
    filler = seq_of(tokens(5000, 5 * BS))
    assert bm.allocate_slots(filler, 5 * BS)  # evicts a's block: the hash 1 is free again
    assert bm.cached.get(1) is None
    bm.free(filler)
    run_prefill(bm, other := seq_of(b + [1]))  # `b` takes the hash 1
    bm.free(other)
    bm.free(second)
    probe = seq_of(b + t + [1])
    assert bm.match_prefix(probe) == BS  # `b` only: the cached `t` followed `a`
    bm.check_invariants([probe])


def test_chained_hash_is_deterministic_and_depends_on_the_parent() -> None:
    ids = tokens(0, BS)
    assert hash_block_tokens(None, ids) == hash_block_tokens(None, tuple(ids))
    first = hash_block_tokens(None, ids)
    assert hash_block_tokens(first, ids) != first
    assert hash_block_tokens(None, ids[:-1] + [10**9]) != first


def test_prefix_match_leaves_at_least_one_token_to_compute() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    prompt = tokens(0, 3 * BS)  # an exact multiple of the block size
    run_prefill(bm, seq_of(prompt))
    again = seq_of(prompt)
    # All 3 blocks are cached, but the last one holds the token whose logits are needed.
    assert bm.match_prefix(again) == 2 * BS
    assert again.num_uncomputed_tokens == BS >= 1
    one_more = seq_of(prompt + [5])
    assert bm.match_prefix(one_more) == 3 * BS
    assert one_more.num_uncomputed_tokens == 1


def test_lru_evicts_the_least_recently_freed_prefix_first() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    a, b = seq_of(tokens(0, BS + 1)), seq_of(tokens(100, BS + 1))
    run_prefill(bm, a)
    run_prefill(bm, b)
    bm.free(a)  # freed first: its full block is the least recently freed prefix
    bm.free(b)
    # Three new blocks: the two uncached partial blocks go first, then a's full block.
    c = seq_of(tokens(900, 3 * BS))
    assert bm.allocate_slots(c, 3 * BS)
    assert bm.match_prefix(seq_of(tokens(0, BS + 1))) == 0
    just_finished = seq_of(tokens(100, BS + 1))  # identical to b
    assert bm.match_prefix(just_finished) == BS
    bm.check_invariants([c, just_finished])


def test_freeing_evicts_tail_blocks_first_so_the_head_of_a_prefix_survives() -> None:
    bm = BlockManager(num_blocks=6, block_size=BS)
    a = seq_of(tokens(0, 4 * BS + 1))
    run_prefill(bm, a)  # 5 blocks: 4 full cached, 1 partial
    bm.free(a)
    c = seq_of(tokens(900, 3 * BS))
    assert bm.allocate_slots(c, 3 * BS)  # the free block, a's partial block, a's block 3
    assert bm.match_prefix(seq_of(tokens(0, 4 * BS + 1))) == 3 * BS


def test_identical_block_computed_twice_keeps_both_and_registers_one() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    prompt = tokens(40, 2 * BS + 3)
    a, b = seq_of(prompt), seq_of(prompt)
    for seq in (a, b):  # both admitted before either computed: no hits
        assert bm.match_prefix(seq) == 0
        assert bm.allocate_slots(seq, seq.num_tokens)
    for seq in (a, b):
        seq.num_computed_tokens = seq.num_tokens
        bm.cache_full_blocks(seq)
    assert set(a.block_table).isdisjoint(b.block_table)
    assert a.block_hashes == b.block_hashes and len(bm.cached) == 2
    bm.check_invariants([a, b])
    bm.free(a)
    bm.free(b)
    assert bm.match_prefix(seq_of(prompt)) == 2 * BS


def test_only_computed_full_blocks_are_cached() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = seq_of(tokens(0, 3 * BS))
    bm.match_prefix(seq)
    assert bm.allocate_slots(seq, 40)
    seq.num_computed_tokens = 40  # a prefill chunk: block 2 is allocated but half computed
    bm.cache_full_blocks(seq)
    assert len(seq.block_hashes) == 2 and len(bm.cached) == 2
    assert bm.allocate_slots(seq, 8)
    seq.num_computed_tokens = 48
    bm.cache_full_blocks(seq)
    assert len(seq.block_hashes) == 3 and len(bm.cached) == 3
    bm.check_invariants([seq])


def test_reset_prefix_cache_forgets_prefixes_but_keeps_counters() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    prompt = tokens(0, 2 * BS + 1)
    first, held = seq_of(prompt), seq_of(prompt)
    run_prefill(bm, first)
    assert run_prefill(bm, held) == 2 * BS
    hits = bm.prefix_cache_hits
    bm.reset_prefix_cache()
    assert bm.cached == {} and bm.prefix_cache_hits == hits
    assert bm.match_prefix(seq_of(prompt)) == 0
    bm.check_invariants([first, held])
    bm.free(first)
    bm.free(held)
    assert bm.num_free_blocks == 8 and bm.cached == {}


def test_disabled_prefix_caching_never_hits_or_registers() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    prompt = tokens(0, 2 * BS + 1)
    run_prefill(bm, seq_of(prompt))
    again = seq_of(prompt)
    assert run_prefill(bm, again) == 0
    assert bm.cached == {} and bm.prefix_cache_queries == 0
    assert bm.num_used_blocks == 6


def test_check_invariants_catches_a_ref_count_that_disagrees_with_the_tables() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    seq = seq_of(tokens(0, BS))
    run_prefill(bm, seq)
    bm.blocks[seq.block_table[0]].ref_count = 2
    with pytest.raises(AssertionError, match="ref_count"):
        bm.check_invariants([seq])
