"""The continuous-batching scheduler: which sequences compute how many tokens this step.

One step has one token budget (max_num_batched_tokens) shared by decodes and prefill
chunks, and at most max_num_seqs sequences run (hold blocks) at once:

1. running decodes (one uncomputed token) get 1 token each, oldest first;
2. running partial prefills (a long prompt mid-chunking, or a recompute after preemption)
   get min(uncomputed, budget left), oldest first;
3. waiting sequences are admitted in arrival order (prefix-cache hit first, then a chunk of
   min(uncomputed, budget left)) while budget, max_num_seqs and blocks allow; admission
   stops at the first one that does not fit, so a long request is never overtaken by
   later short ones. No admission in a step that had to preempt: memory is tight, and
   re-admitting the victims at once would only thrash.

The completions of a request with n > 1 are sequences of their own; each but the first
(the leader) is admitted once the leader's prompt is computed, holding the leader's full
prompt blocks (ref-counted), so the prompt is computed once (engine/parallel_sampling.py).

When a running sequence cannot get blocks, the newest running sequence is preempted by
recompute (its blocks freed, back to the waiting queue ahead of every later arrival) and the
allocation retried; when the newest is the sequence itself, it preempts itself.

Invariant: at most one running sequence is mid-prefill, and it is the newest. Admission gives
each admitted sequence all its uncomputed tokens unless the budget runs out (then nothing
after it is admitted), and pass 2 serves that one partial prefill before any admission. So a victim,
always the newest, is never one already scheduled this step: decodes are visited oldest
first, and the partial prefill has nobody newer.

Why nothing deadlocks or starves: the cache holds at least one max_model_len sequence
(checked in __init__) and `add` rejects sequences that could outgrow max_model_len, so the
oldest running sequence can always get its blocks by preempting every newer one. A
preempted sequence waits ahead of everything that arrived after it, and admission never
skips the head of the queue.

The engine drives it: `schedule()` -> run the model on `output.scheduled` -> `on_step_done`
-> append a sampled token to each sequence it returns, or `finish` it.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from tritonforge.engine.block_manager import BlockManager
from tritonforge.engine.sequence import Sequence, SequenceStatus


def needs_sampling(seq: Sequence, num_new_tokens: int) -> bool:
    """Whether computing `num_new_tokens` computes `seq`'s last token, so the step samples
    its next one. Valid between `schedule` and `on_step_done`."""
    return seq.num_computed_tokens + num_new_tokens == seq.num_tokens


_WAIT = object()  # _leader_blocks: not yet


@dataclass
class SchedulerOutput:
    # (sequence, tokens to compute from its num_computed_tokens); the first num_decodes
    # entries are decodes (1 token each), the rest prefill chunks.
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    num_decodes: int = 0
    preempted: list[Sequence] = field(default_factory=list)
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class _Step:
    """What one `schedule()` call has decided so far."""

    budget: int
    decodes: dict[Sequence, int] = field(default_factory=dict)
    prefills: dict[Sequence, int] = field(default_factory=dict)
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int) -> None:
        for name, value in (("max_num_seqs", max_num_seqs),
                            ("max_num_batched_tokens", max_num_batched_tokens),
                            ("max_model_len", max_model_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
        if block_manager.num_blocks_for(max_model_len) > block_manager.num_blocks:
            raise ValueError(
                f"max_model_len={max_model_len} needs "
                f"{block_manager.num_blocks_for(max_model_len)} blocks of "
                f"{block_manager.block_size} tokens but the KV cache has num_blocks="
                f"{block_manager.num_blocks}; one full-length sequence must always fit")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()  # arrival order
        self.running: list[Sequence] = []  # arrival order: the last is the preemption victim
        self.requests: dict[str, Sequence] = {}  # request_id -> unfinished sequence
        self._arrival: dict[int, int] = {}  # seq_id -> position in arrival order
        self._arrivals = itertools.count()
        self.num_preemptions_total = 0

    # ---- requests ------------------------------------------------------------------------
    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def add(self, seq: Sequence) -> None:
        """Queue a new request (FCFS). Rejects one whose prompt plus max_tokens exceeds
        max_model_len; with max_tokens None the engine must finish it with "length" at
        max_model_len, which keeps every sequence within the cache."""
        if seq.status is not SequenceStatus.WAITING or seq.block_table:
            raise ValueError(f"request {seq.request_id} must be a new WAITING sequence")
        if seq.request_id in self.requests:
            raise ValueError(f"request_id {seq.request_id!r} is already scheduled")
        max_tokens = getattr(seq.sampling_params, "max_tokens", None) or 0
        if seq.num_tokens + max_tokens > self.max_model_len:
            raise ValueError(
                f"request {seq.request_id}: {seq.num_tokens} prompt tokens + max_tokens="
                f"{max_tokens} exceed max_model_len={self.max_model_len}")
        self._arrival[seq.seq_id] = next(self._arrivals)
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Finish an unfinished request at once (any state), freeing its blocks; None when
        the id is unknown or already finished. Safe between schedule and on_step_done."""
        seq = self.requests.get(request_id)
        if seq is not None:
            self.finish(seq, "abort")
        return seq

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        else:
            return
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        del self.requests[seq.request_id]
        del self._arrival[seq.seq_id]

    # ---- one step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        step = _Step(budget=self.max_num_batched_tokens)
        for seq in list(self.running):  # pass 1: decodes
            if step.budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or seq.num_uncomputed_tokens != 1:
                continue
            if self._allocate_or_preempt(step, seq, 1):
                step.decodes[seq] = 1
                step.budget -= 1
        for seq in list(self.running):  # pass 2: partial prefills
            if step.budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or seq in step.decodes:
                continue
            if seq.num_uncomputed_tokens < 1:
                raise RuntimeError(
                    f"running request {seq.request_id} has no uncomputed token: the engine "
                    "must append a sampled token or finish it after each step")
            num_new = seq.clip_chunk(min(seq.num_uncomputed_tokens, step.budget), step.budget)
            if num_new == 0:
                continue  # an image that must be prefilled whole does not fit this step
            if self._allocate_or_preempt(step, seq, num_new):
                step.prefills[seq] = num_new
                step.budget -= num_new
        if not step.preempted:
            self._admit(step)
        scheduled = list(step.decodes.items()) + list(step.prefills.items())
        return SchedulerOutput(
            scheduled=scheduled,
            num_decodes=len(step.decodes),
            preempted=step.preempted,
            num_batched_tokens=sum(n for _, n in scheduled),
        )

    def _admit(self, step: _Step) -> None:  # pass 3
        bm = self.block_manager
        while self.waiting and step.budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_tokens > self.max_model_len:
                raise RuntimeError(f"request {seq.request_id} outgrew max_model_len: the "
                                   "engine must finish it with 'length' at the limit")
            shared = self._leader_blocks(seq)
            if shared == _WAIT:
                break  # its leader is still computing the prompt it will share (FCFS)
            hits = shared if shared is not None else bm.cached_prefix_blocks(seq)
            num_cached = len(hits) * bm.block_size
            num_new = min(seq.num_tokens - num_cached, step.budget)
            if seq.mm is not None:  # measured from the cached prefix it will start at
                computed, seq.num_computed_tokens = seq.num_computed_tokens, num_cached
                num_new = seq.clip_chunk(num_new, step.budget)
                seq.num_computed_tokens = computed
            if num_new == 0 or not bm.can_allocate(num_cached + num_new, hits):
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            if shared is not None:
                bm.share_prefix(seq, seq.leader, len(shared))  # type: ignore[arg-type]
            else:
                bm.match_prefix(seq)
            if not bm.allocate_slots(seq, num_new):
                raise RuntimeError("can_allocate and allocate_slots disagree")
            seq.status = SequenceStatus.RUNNING
            self._insert_by_arrival(self.running, seq)
            step.prefills[seq] = num_new
            step.budget -= num_new

    def _leader_blocks(self, seq: Sequence) -> list[int] | None | object:
        """n > 1 (engine/parallel_sampling.py): the leader's full prompt blocks `seq` will
        share; _WAIT while the leader runs but has not computed them yet (it is admitted
        first, so this is a step or a few chunks); None to admit `seq` as any other (no
        leader, a leader that finished or was preempted, or `seq` itself was preempted
        after generating: the prefix cache serves those)."""
        leader = seq.leader
        if (leader is None or leader.status is not SequenceStatus.RUNNING
                or seq.num_output_tokens):
            return None
        # At least one prompt token stays to compute: the step that samples needs logits.
        num_shared = (seq.num_prompt_tokens - 1) // self.block_manager.block_size
        if leader.num_computed_tokens < num_shared * self.block_manager.block_size:
            return _WAIT
        return leader.block_table[:num_shared]

    def _allocate_or_preempt(self, step: _Step, seq: Sequence, num_new_tokens: int) -> bool:
        """Get blocks for `seq`, preempting the newest running sequences as needed; False
        when `seq` itself had to be preempted."""
        while not self.block_manager.allocate_slots(seq, num_new_tokens):
            victim = self.running[-1]  # the newest: not scheduled yet (module invariant)
            self._preempt(step, victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, step: _Step, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_cached_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions_total += 1
        self._insert_by_arrival(self.waiting, seq)
        step.preempted.append(seq)

    def _insert_by_arrival(self, queue: list[Sequence] | deque[Sequence], seq: Sequence) -> None:
        # Preempted sequences arrived before every waiting one, so this is usually the
        # front (waiting) or the back (running); the scan keeps it right in any case.
        key = self._arrival[seq.seq_id]
        index = next((i for i, other in enumerate(queue)
                      if self._arrival[other.seq_id] > key), len(queue))
        queue.insert(index, seq)

    def on_step_done(self, output: SchedulerOutput) -> list[Sequence]:
        """Advance each scheduled sequence by its tokens and cache its newly full blocks;
        returns the sequences whose last token was computed (they need a sampled token).
        Sequences finished or aborted since `schedule` are skipped."""
        sampled: list[Sequence] = []
        block_size = self.block_manager.block_size
        for seq, num_new in output.scheduled:
            if seq.status is not SequenceStatus.RUNNING:
                continue
            seq.num_computed_tokens += num_new
            # Most steps fill no block: skip the call (cache_full_blocks would find nothing).
            if seq.num_computed_tokens // block_size > len(seq.block_hashes):
                self.block_manager.cache_full_blocks(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                sampled.append(seq)
        return sampled

    # ---- test support --------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError naming the first broken invariant of the queues and blocks.
        Call it between steps (after sampling), not between schedule and on_step_done."""
        for seq in self.waiting:
            if seq.status is not SequenceStatus.WAITING or seq.block_table \
                    or seq.num_computed_tokens:
                raise AssertionError(f"waiting {seq.request_id} holds blocks or computed state")
        for seq in self.running:
            if seq.status is not SequenceStatus.RUNNING:
                raise AssertionError(f"{seq.request_id} in running has status {seq.status}")
        if len(self.running) > self.max_num_seqs:
            raise AssertionError(f"{len(self.running)} running > max_num_seqs")
        for queue in (list(self.waiting), self.running):
            keys = [self._arrival[s.seq_id] for s in queue]
            if keys != sorted(keys):
                raise AssertionError("a queue left arrival order")
        partial = [s for s in self.running if s.num_uncomputed_tokens > 1]
        if partial and partial != self.running[-1:]:
            raise AssertionError("a mid-prefill sequence is not the newest running one")
        if len(self.requests) != len(self.waiting) + len(self.running):
            raise AssertionError("requests map out of sync with the queues")
        self.block_manager.check_invariants([*self.running, *self.waiting])
