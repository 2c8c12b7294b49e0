"""The paged KV block manager: ref-counted fixed-size blocks, per-sequence block tables and
prefix caching of full blocks with LRU eviction.

A block holds the K/V of `block_size` consecutive tokens of one sequence. Full blocks are
immutable once computed, so several sequences may share one (ref count > 1). Prefix
caching keys a full block by a chained hash of everything before and in it,
`hash_block_tokens(parent_hash, block_tokens)`, but never trusts the hash: a registered
block keeps its tokens and the `prefix_id` of its parent, where a prefix id is a number
handed out once per registration and never reused. A lookup walks the blocks in order and
accepts block j only if its tokens equal the sequence's and its parent is exactly the
block accepted at j - 1; by induction a hit holds K/V of exactly the sequence's prefix,
whatever the hash function does (tests swap in colliding ones).

Free blocks (ref 0) wait in one LRU queue. A free block may still hold a cached prefix: it
counts as free capacity, a lookup may revive it (it leaves the queue), and allocation takes
the queue's front block and evicts its hash. Freed blocks that hold no cached prefix go to
the front (they are worth nothing, so they are reused first); cached ones go to the back in
reverse table order, so a sequence's tail blocks, the least likely to be shared, are
evicted before its head.

Invariants (`check_invariants`): a block's ref count equals the number of block tables
holding it; the free queue holds exactly the ref-0 blocks; `cached` maps every registered
hash to a block whose stored tokens and parent hash hash to it, and a block is registered
iff `cached` points at it; a registered block in a sequence's table holds that sequence's
tokens and prefix id at that position.
"""

from __future__ import annotations

import hashlib
import itertools
from array import array
from collections import OrderedDict
from collections.abc import Iterable
from collections.abc import Sequence as TokenIds
from dataclasses import dataclass

from tritonforge.engine.sequence import Sequence


def hash_block_tokens(parent_hash: int | None, token_ids: TokenIds[int]) -> int:
    """Chained hash of a full block: blake2b (128 bits) of the parent's hash and the ids.

    Deterministic across processes and versions (unlike `hash()`, salted for str and only
    64 bits wide), so hashes can be logged or compared between workers. Correctness never
    rests on it: hits are verified (see the module docstring).
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(b"root" if parent_hash is None else parent_hash.to_bytes(16, "little"))
    digest.update(array("q", token_ids).tobytes())
    return int.from_bytes(digest.digest(), "little")


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    # Set only while the block is registered in the prefix cache. A lookup verifies the
    # tokens and parent_prefix_id; the hashes only find the candidate.
    block_hash: int | None = None
    parent_hash: int | None = None
    token_ids: tuple[int, ...] = ()
    prefix_id: int | None = None  # unique per registration: names this exact prefix
    parent_prefix_id: int | None = None  # None for a first block


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an integer >= 1; got {num_blocks!r}")
        if (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16
                or block_size % 16):
            raise ValueError(f"block_size must be a positive multiple of 16; got {block_size!r}")
        if not isinstance(enable_prefix_caching, bool):
            raise ValueError(
                f"enable_prefix_caching must be True or False; got {enable_prefix_caching!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Front = next to be allocated (least recently freed); values unused.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        # seq_id -> prefix id of each full computed block (parallel to seq.block_hashes): the
        # registered block with the same exact prefix, or a fresh id nobody registered when
        # a colliding block holds the hash.
        self.prefix_ids: dict[int, list[int]] = {}
        self._next_prefix_id = itertools.count()
        # Prometheus-style monotonic counters, in tokens; reset_prefix_cache keeps them.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ---- capacity ------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take, including evictable cached ones."""
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences; cached free prefix blocks do not count."""
        return self.num_used_blocks / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int, prefix_blocks: Iterable[int] = ()) -> bool:
        """Whether a sequence holding nothing could cover `num_tokens` after attaching
        `prefix_blocks` (from `cached_prefix_blocks`). Reviving a free cached block takes it
        out of the free queue, so those count against the free capacity too."""
        prefix_blocks = list(prefix_blocks)
        revived = sum(1 for b in prefix_blocks if self.blocks[b].ref_count == 0)
        new = max(0, self.num_blocks_for(num_tokens) - len(prefix_blocks))
        return new <= self.num_free_blocks - revived

    # ---- prefix cache --------------------------------------------------------------------
    def cached_prefix_blocks(self, seq: Sequence) -> list[int]:
        """Ids of the cached blocks serving `seq`'s longest cached prefix; changes nothing.

        Only full blocks among the first num_tokens - 1 tokens qualify: at least one token
        is always computed, since the step that samples needs its logits.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent_hash: int | None = None
        parent_id: int | None = None
        for j in range((seq.num_tokens - 1) // self.block_size):
            tokens = seq.block_key(j, self.block_size)
            block_hash = hash_block_tokens(parent_hash, tokens)
            block_id = self.cached.get(block_hash)
            if block_id is None or not self._holds(block_id, parent_id, tokens):
                break  # a miss, or a hash collision: never reuse K/V of another prefix
            hits.append(block_id)
            parent_hash, parent_id = block_hash, self.blocks[block_id].prefix_id
        return hits

    def _holds(self, block_id: int, parent_prefix_id: int | None, tokens: tuple[int, ...]) -> bool:
        """Whether a registered block holds exactly `tokens` after the prefix named
        `parent_prefix_id`."""
        block = self.blocks[block_id]
        return block.token_ids == tokens and block.parent_prefix_id == parent_prefix_id

    def match_prefix(self, seq: Sequence) -> int:
        """Attach `seq`'s cached prefix (ref++) and mark it computed; returns its length in
        tokens. `seq` must hold no blocks (waiting, or preempted)."""
        if seq.block_table or seq.num_computed_tokens:
            raise RuntimeError(f"match_prefix on {seq.request_id}, which already holds blocks")
        hits = self.cached_prefix_blocks(seq)
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1
        seq.block_table = list(hits)
        seq.block_hashes = [self.blocks[b].block_hash for b in hits]  # type: ignore[misc]
        if self.enable_prefix_caching:
            ids = [self.blocks[b].prefix_id for b in hits]
            self.prefix_ids[seq.seq_id] = ids  # type: ignore[assignment]
        num_cached = len(hits) * self.block_size
        seq.num_cached_tokens = seq.num_computed_tokens = num_cached
        if self.enable_prefix_caching:
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += num_cached
        return num_cached

    def share_prefix(self, seq: Sequence, leader: Sequence, num_blocks: int) -> int:
        """Attach the first `num_blocks` (full, computed) blocks of `leader`'s table to `seq`,
        which holds none and has the same tokens there (n > 1: completions of one prompt);
        marks them computed and returns their length in tokens. Unlike match_prefix this
        needs no prefix cache: the leader's blocks are shared whether registered or not."""
        if seq.block_table or seq.num_computed_tokens:
            raise RuntimeError(f"share_prefix on {seq.request_id}, which already holds blocks")
        num_tokens = num_blocks * self.block_size
        if (num_blocks > len(leader.block_table) or leader.num_computed_tokens < num_tokens
                or seq.token_ids[:num_tokens] != leader.token_ids[:num_tokens]):
            raise RuntimeError(f"{seq.request_id} cannot share {num_blocks} blocks of "
                               f"{leader.request_id}")
        seq.block_table = leader.block_table[:num_blocks]
        for block_id in seq.block_table:
            self.blocks[block_id].ref_count += 1  # in use by the leader: never in the queue
        seq.block_hashes = leader.block_hashes[:num_blocks]
        if self.enable_prefix_caching:
            self.prefix_ids[seq.seq_id] = self.prefix_ids.get(leader.seq_id, [])[:num_blocks]
        seq.num_cached_tokens = seq.num_computed_tokens = num_tokens
        return num_tokens

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks that became full and computed since the last call.

        When an identical block is already registered (two sequences computed the same
        prefix concurrently) the sequence keeps its own block unregistered: both hold the
        same K/V, and the registered one keeps serving lookups. When a different block holds
        the hash (a collision), this prefix simply stays uncached.
        """
        if not self.enable_prefix_caching:
            return
        ids = self.prefix_ids.setdefault(seq.seq_id, [])
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        for j in range(len(seq.block_hashes), num_full):
            parent_hash = seq.block_hashes[j - 1] if j else None
            parent_id = ids[j - 1] if j else None
            tokens = seq.block_key(j, self.block_size)
            block_hash = hash_block_tokens(parent_hash, tokens)
            seq.block_hashes.append(block_hash)
            existing = self.cached.get(block_hash)
            if existing is not None and self._holds(existing, parent_id, tokens):
                ids.append(self.blocks[existing].prefix_id)  # type: ignore[arg-type]
                continue
            prefix_id = next(self._next_prefix_id)
            ids.append(prefix_id)
            if existing is None:
                block = self.blocks[seq.block_table[j]]
                self.cached[block_hash] = block.block_id
                block.block_hash, block.parent_hash = block_hash, parent_hash
                block.token_ids = tokens
                block.prefix_id, block.parent_prefix_id = prefix_id, parent_id

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (e.g. after new weights); blocks in use stay attached
        but will no longer be shared. The hit/query counters are monotonic and stay."""
        for block_id in self.cached.values():
            self._unregister(self.blocks[block_id])
        self.cached.clear()

    def _unregister(self, block: Block) -> None:
        block.block_hash, block.parent_hash, block.token_ids = None, None, ()
        block.prefix_id = block.parent_prefix_id = None

    # ---- allocation ----------------------------------------------------------------------
    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow `seq`'s table to cover num_computed_tokens + num_new_tokens tokens.

        All or nothing: on False nothing changed (the scheduler then preempts someone).
        """
        needed = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens)
        new = needed - len(seq.block_table)
        if new <= 0:
            return True
        if new > len(self.free_queue):
            return False
        for _ in range(new):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:  # evict the least recently freed prefix
                del self.cached[block.block_hash]
                self._unregister(block)
            block.ref_count = 1
            seq.block_table.append(block_id)
        return True

    def free(self, seq: Sequence) -> None:
        """Release every block of `seq` (tail first) and clear its table and hashes."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
                if block.block_hash is None:
                    self.free_queue.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.block_hashes = []
        self.prefix_ids.pop(seq.seq_id, None)

    # ---- test support --------------------------------------------------------------------
    def check_invariants(self, seqs: Iterable[Sequence]) -> None:
        """Raise AssertionError naming the first broken invariant; `seqs` must be every
        sequence that holds blocks (others may be included)."""
        holders: dict[int, int] = {}
        for seq in seqs:
            if len(set(seq.block_table)) != len(seq.block_table):
                raise AssertionError(f"{seq.request_id} holds a block twice: {seq.block_table}")
            if seq.block_table and (
                    len(seq.block_table) < self.num_blocks_for(seq.num_computed_tokens)):
                raise AssertionError(f"{seq.request_id}'s table misses computed tokens")
            ids = self.prefix_ids.get(seq.seq_id, [])
            if self.enable_prefix_caching and seq.block_table and (
                    len(ids) != len(seq.block_hashes)):
                raise AssertionError(f"{seq.request_id}'s prefix ids and hashes disagree")
            for j, block_id in enumerate(seq.block_table):
                holders[block_id] = holders.get(block_id, 0) + 1
                block = self.blocks[block_id]
                if block.block_hash is not None and (
                        block.token_ids != seq.block_key(j, self.block_size)
                        or (j < len(ids) and block.prefix_id != ids[j])):
                    raise AssertionError(
                        f"{seq.request_id} block {j} shares K/V of another prefix")
        for block in self.blocks:
            if block.ref_count != holders.get(block.block_id, 0):
                raise AssertionError(f"block {block.block_id} ref_count {block.ref_count} "
                                     f"!= {holders.get(block.block_id, 0)} tables holding it")
            if (block.ref_count == 0) != (block.block_id in self.free_queue):
                raise AssertionError(f"block {block.block_id} (ref {block.ref_count}) is "
                                     f"{'not ' if block.ref_count == 0 else ''}in the free queue")
            if block.block_hash is not None and self.cached.get(block.block_hash) != block.block_id:
                raise AssertionError(f"block {block.block_id} has a hash the cache lost")
        for block_hash, block_id in self.cached.items():
            block = self.blocks[block_id]
            if block.block_hash != block_hash or len(block.token_ids) != self.block_size:
                raise AssertionError(f"cached hash points at block {block_id} with other data")
            if hash_block_tokens(block.parent_hash, block.token_ids) != block_hash:
                raise AssertionError(f"block {block_id}'s tokens do not hash to its key")
