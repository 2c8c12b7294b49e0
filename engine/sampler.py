"""The sampler: one step's logits [S, V] -> one token (and its logprobs) per row.

Design: `SamplingMetadata.build` turns the S rows' SamplingParams and token histories into
tensors once per step; `Sampler.__call__` then runs a fixed pipeline, vectorized over the
batch, on the raw model logits:

  1. penalties (rows that ask): repetition over prompt + output tokens as HF does (divide
     positive logits, multiply negative ones); presence and frequency over the OUTPUT tokens,
     as vLLM and OpenAI define them;
  2. min_tokens: EOS and stop_token_ids get -inf while a row has fewer outputs than asked;
     structured outputs: each constrained row's disallowed tokens get -inf (its grammar's
     packed bitmask, engine/guided_decoding.py);
  3. greedy rows: argmax (ties go to the lowest id, as torch.argmax);
  4. random rows: temperature, top-k, top-p, min-p, then one draw per row by the
     exponential race (argmax of p / Exp(1) noise, an exact categorical draw). Top-p needs
     one stable sort of the vocabulary (shared with top-k); top-k alone uses torch.topk.
     Both keep exactly k tokens, ties going to the lowest ids, so top_k=1 is argmax.

Fused path: a batch that needs nothing but temperature or greedy (no top-k/top-p/min-p,
penalties, min_tokens bans, seeded rows or top-k logprobs) takes kernels/sampling.py on
CUDA: one kernel reads each row's logits once and returns its token and logprob, with the
same exponential race drawn from in-kernel Philox noise keyed by a seed the Sampler's
generator draws each step (so unseeded runs stay reproducible under the engine seed). The
tokens are draws from the same distribution, not the same draws as the unfused path's.
Everything else, and every CPU batch, runs the pipeline below unchanged.

Logprobs come from the RAW logits (log_softmax before penalties and temperature, vLLM v1's
default), so they describe the model, not the sampling knobs.

Reproducibility: a seeded request owns a torch.Generator (see `request_generator`) and its
row's noise is drawn from it alone, on a [V] tensor, so the token it gets depends on its
logits and its generator, never on the other rows or their order. Unseeded rows share the
Sampler's generator (seeded by the engine seed) and draw their noise in one call. Per-row
Python loops exist only for seeded rows.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from tritonforge.engine.sampling_params import SamplingParams
from tritonforge.kernels import dispatch
from tritonforge.kernels.sampling import sample as fused_sample
from tritonforge.kernels.token_bitmask import apply_token_bitmask, apply_token_bitmask_ref

# Above this top_k, torch.topk costs about what the full sort does.
TOP_K_FAST_MAX = 1024


class TokenLogprobs(dict):
    """{token id: logprob} of one position (the top-k and the sampled token), and
    `sampled_rank`: the sampled token's rank among all tokens (1 = most likely; vLLM's
    Logprob.rank). A dict, so every consumer of plain logprob dicts reads it unchanged; the
    rank rides along as an attribute (kept by pickling, the engine core's wire)."""

    sampled_rank: int | None = None


@dataclass
class SamplerOutput:
    """token_ids[i]: row i's token. logprobs[i]: None when row i did not ask, else
    {token id: logprob} holding its top-`logprobs` alternatives and the sampled token.
    sampled_logprobs[i]: the sampled token's logprob under the raw logits (every row)."""

    token_ids: list[int]
    logprobs: list[dict[int, float] | None]
    sampled_logprobs: list[float]


def request_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    """The per-request generator the engine keeps for a seeded request (None if unseeded)."""
    if params.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


@dataclass
class SamplingMetadata:
    """One step's sampling inputs as tensors on the logits' device.

    Rows split into greedy rows and random rows; the per-row knobs of random rows are
    [R] tensors aligned with `random_rows`. An optional stage whose knob is off in every
    row is None, so the common batch pays nothing for it.
    """

    num_rows: int
    vocab_size: int
    greedy_rows: torch.Tensor  # [G] int64
    random_rows: torch.Tensor  # [R] int64
    temperature: torch.Tensor | None  # [R] float32
    top_k: torch.Tensor | None  # [R] int64; vocab_size where off
    max_top_k: int  # the largest top_k in use (0 if none): sizes the top-k-only fast path
    top_p: torch.Tensor | None  # [R] float32; 1.0 where off
    min_p: torch.Tensor | None  # [R] float32; 0.0 where off
    # (position in random_rows, generator) for seeded random rows.
    seeded: list[tuple[int, torch.Generator]]
    unseeded_positions: torch.Tensor | None  # [U] positions in random_rows; None if all unseeded
    penalty_rows: torch.Tensor | None  # [P] int64
    repetition_penalty: torch.Tensor | None  # [P] float32
    presence_penalty: torch.Tensor | None  # [P] float32
    frequency_penalty: torch.Tensor | None  # [P] float32
    prompt_mask: torch.Tensor | None  # [P, V] bool: token occurs in the prompt
    output_counts: torch.Tensor | None  # [P, V] float32: occurrences in the output
    banned: tuple[torch.Tensor, torch.Tensor] | None  # (rows [B], token ids [B]) -> -inf
    num_logprobs: list[int | None]  # per row
    logprob_rows: torch.Tensor | None  # [L] rows that asked for logprobs
    # Structured outputs: (rows [G] int64, packed allowed tokens [G, ceil(V / 32)] int32);
    # engine/guided_decoding.py fills it per step, after the build.
    token_bitmask: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def is_plain(self) -> bool:
        """True when every row is greedy or samples with a temperature alone: no filter,
        penalty, min_tokens ban, token mask, seeded generator or top-k logprobs (the fused
        path)."""
        return (self.top_k is None and self.top_p is None and self.min_p is None
                and self.penalty_rows is None and self.banned is None and not self.seeded
                and self.logprob_rows is None and self.token_bitmask is None)

    @property
    def all_greedy(self) -> bool:
        return self.random_rows.numel() == 0

    @property
    def all_random(self) -> bool:
        return self.greedy_rows.numel() == 0

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        generators: list[torch.Generator | None],
        eos_token_ids: set[int] | list[int],
        vocab_size: int,
        device: torch.device | str,
    ) -> SamplingMetadata:
        """generators[i] is row i's request generator (`request_generator`), None if unseeded."""
        num_rows = len(params)
        if not len(prompt_token_ids) == len(output_token_ids) == len(generators) == num_rows:
            raise ValueError(
                "params, prompt_token_ids, output_token_ids and generators must have one "
                f"entry per row; got {num_rows}, {len(prompt_token_ids)}, "
                f"{len(output_token_ids)}, {len(generators)}"
            )

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        greedy = [i for i, p in enumerate(params) if p.is_greedy]
        rand = [i for i, p in enumerate(params) if not p.is_greedy]
        rp = [params[i] for i in rand]
        temperature = top_k = top_p = min_p = None
        max_top_k = 0
        seeded: list[tuple[int, torch.Generator]] = []
        unseeded_positions = None
        if rand:
            temperature = tensor([p.temperature for p in rp], torch.float32)
            max_top_k = min(max(p.top_k for p in rp), vocab_size)
            if max_top_k > 0:
                top_k = tensor([min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size
                                for p in rp], torch.int64)
            if any(p.top_p < 1.0 for p in rp):
                top_p = tensor([p.top_p for p in rp], torch.float32)
            if any(p.min_p > 0.0 for p in rp):
                min_p = tensor([p.min_p for p in rp], torch.float32)
            seeded = [(j, generators[i]) for j, i in enumerate(rand) if generators[i] is not None]
            if seeded:
                unseeded_positions = tensor(
                    [j for j, i in enumerate(rand) if generators[i] is None], torch.int64)

        pen = [i for i, p in enumerate(params) if p.has_penalties]
        penalty_rows = rep = presence = frequency = prompt_mask = output_counts = None
        if pen:
            pp = [params[i] for i in pen]
            penalty_rows = tensor(pen, torch.int64)
            rep = tensor([p.repetition_penalty for p in pp], torch.float32)
            presence = tensor([p.presence_penalty for p in pp], torch.float32)
            frequency = tensor([p.frequency_penalty for p in pp], torch.float32)
            rows, ids = _flat_ids([output_token_ids[i] for i in pen], vocab_size, device)
            output_counts = torch.zeros(len(pen), vocab_size, device=device)
            output_counts.index_put_((rows, ids), torch.ones_like(ids, dtype=torch.float32),
                                     accumulate=True)
            if any(p.repetition_penalty != 1.0 for p in pp):
                rows, ids = _flat_ids([prompt_token_ids[i] for i in pen], vocab_size, device)
                prompt_mask = torch.zeros(len(pen), vocab_size, dtype=torch.bool, device=device)
                prompt_mask[rows, ids] = True

        # min_tokens: EOS counts as a stop only without ignore_eos, so only then is it banned.
        eos = set(eos_token_ids)
        ban_rows: list[int] = []
        ban_ids: list[int] = []
        for i, p in enumerate(params):
            if len(output_token_ids[i]) < p.min_tokens:
                stops = set(p.stop_token_ids) | (set() if p.ignore_eos else eos)
                ids = sorted(t for t in stops if 0 <= t < vocab_size)
                ban_rows += [i] * len(ids)
                ban_ids += ids
        banned = (tensor(ban_rows, torch.int64), tensor(ban_ids, torch.int64)) if ban_rows else None

        num_logprobs = [p.logprobs for p in params]
        lp_rows = [i for i, k in enumerate(num_logprobs) if k is not None]
        return cls(
            num_rows=num_rows, vocab_size=vocab_size,
            greedy_rows=tensor(greedy, torch.int64), random_rows=tensor(rand, torch.int64),
            temperature=temperature, top_k=top_k, max_top_k=max_top_k, top_p=top_p, min_p=min_p,
            seeded=seeded, unseeded_positions=unseeded_positions,
            penalty_rows=penalty_rows, repetition_penalty=rep, presence_penalty=presence,
            frequency_penalty=frequency, prompt_mask=prompt_mask, output_counts=output_counts,
            banned=banned, num_logprobs=num_logprobs,
            logprob_rows=tensor(lp_rows, torch.int64) if lp_rows else None,
        )


def _flat_ids(
    rows: list[list[int]], vocab_size: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index [T], token id [T]) over every id of every row, ids outside [0, V) dropped.
    numpy's fromiter converts the Python ints several times faster than torch.tensor on
    nested lists; this runs every step over whole prompts."""
    lengths = [len(r) for r in rows]
    ids = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64,
                                       count=sum(lengths)))
    row = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(lengths))
    keep = (ids >= 0) & (ids < vocab_size)
    return row[keep].to(device), ids[keep].to(device)


class Sampler:
    """Picks one token per row; owns the generator that unseeded rows share.

    fused: None takes the fused kernel for plain batches on CUDA (kernels.dispatch decides);
    True takes it for plain batches on any device (CPU only under TRITON_INTERPRET=1, for
    tests); False never takes it.
    """

    def __init__(self, seed: int = 0, device: torch.device | str = "cpu",
                 fused: bool | None = None) -> None:
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.fused = fused

    def uses_fused_path(self, logits: torch.Tensor, metadata: SamplingMetadata) -> bool:
        if self.fused is False or not metadata.is_plain:
            return False
        if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        return self.fused is True or dispatch.use_triton(logits)

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        # logits: [S, V] raw model logits (float32; other dtypes are upcast)
        md = metadata
        if logits.dim() != 2 or logits.shape != (md.num_rows, md.vocab_size):
            raise ValueError(
                f"logits must be [{md.num_rows}, {md.vocab_size}], got {list(logits.shape)}"
            )
        if self.uses_fused_path(logits, md):
            token_ids, sampled_lp = self._sample_fused(logits, md)
            ids, lps = torch.stack((token_ids.double(), sampled_lp.double())).tolist()
            return SamplerOutput([int(t) for t in ids], [None] * md.num_rows, lps)
        raw = logits.float()
        processed = apply_token_mask(apply_min_tokens(apply_penalties(raw, md), md), raw, md)

        if md.all_greedy:
            token_ids = processed.argmax(dim=-1)
        elif md.all_random:
            token_ids = self._sample(processed, md)
        else:
            token_ids = torch.empty(md.num_rows, dtype=torch.int64, device=raw.device)
            token_ids[md.greedy_rows] = processed[md.greedy_rows].argmax(dim=-1)
            token_ids[md.random_rows] = self._sample(processed[md.random_rows], md)

        # log p(token) = logit - logsumexp(logits): one reduction, no [S, V] log_softmax.
        sampled_lp = raw.gather(1, token_ids[:, None]).squeeze(1) - raw.logsumexp(dim=-1)
        logprobs: list[dict[int, float] | None] = [None] * md.num_rows
        if md.logprob_rows is not None:
            self._fill_logprobs(raw, token_ids, sampled_lp, md, logprobs)
        # One device->host transfer (one sync) for both: float64 holds every token id and
        # every float32 logprob exactly.
        ids, lps = torch.stack((token_ids.double(), sampled_lp.double())).tolist()
        return SamplerOutput([int(t) for t in ids], logprobs, lps)

    def _sample_fused(self, logits: torch.Tensor, md: SamplingMetadata
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        # logits: [S, V] raw -> (token ids [S], raw-logit logprobs [S])
        if md.all_greedy:
            return fused_sample(logits, None, None)
        if md.all_random:
            temperature = md.temperature  # both builders list random rows in order: 0..S-1
        else:
            temperature = torch.zeros(md.num_rows, dtype=torch.float32, device=logits.device)
            temperature[md.random_rows] = md.temperature
        # The Philox key for this step, drawn on the generator's device: no host sync.
        seed = torch.randint(0, 2**63 - 1, (1,), generator=self.generator,
                             device=self.generator.device, dtype=torch.int64)
        return fused_sample(logits, temperature, seed.to(logits.device, non_blocking=True))

    def _sample(self, logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        # logits: [R, V] penalized logits of the random rows -> [R] token ids
        logits = logits / md.temperature[:, None]
        if md.top_p is None and md.top_k is not None and md.max_top_k <= TOP_K_FAST_MAX:
            logits = _apply_top_k(logits, md.top_k, md.max_top_k)
        elif md.top_k is not None or md.top_p is not None:
            logits = _apply_top_k_top_p(logits, md.top_k, md.top_p)
        probs = logits.softmax(dim=-1)
        if md.min_p is not None:
            # Relative to the top probability, so top-k/top-p renormalization doesn't matter.
            threshold = md.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
            probs = probs.masked_fill(probs < threshold, 0.0)
        noise = torch.empty_like(probs)
        if not md.seeded:
            noise.exponential_(generator=self.generator)
        else:
            if md.unseeded_positions.numel():
                shared = torch.empty(md.unseeded_positions.numel(), probs.shape[1],
                                     device=probs.device)
                noise[md.unseeded_positions] = shared.exponential_(generator=self.generator)
            for pos, generator in md.seeded:
                noise[pos] = torch.empty(probs.shape[1], device=probs.device).exponential_(
                    generator=generator)
        # Exp(1) noise can round to 0; 0/0 would be NaN, which argmax prefers. Clamping keeps
        # banned tokens (p = 0) at 0.
        return (probs / noise.clamp_min_(torch.finfo(noise.dtype).tiny)).argmax(dim=-1)

    @staticmethod
    def _fill_logprobs(
        raw: torch.Tensor,
        token_ids: torch.Tensor,
        sampled_lp: torch.Tensor,
        md: SamplingMetadata,
        out: list[dict[int, float] | None],
    ) -> None:
        # raw: [S, V]; token_ids, sampled_lp: [S]
        rows = md.logprob_rows
        logprobs = raw[rows].log_softmax(dim=-1)  # [L, V]
        picked = token_ids[rows]
        # The dict's values all come from this log_softmax, the sampled token's included.
        picked_lp = logprobs.gather(1, picked[:, None]).squeeze(1)
        sampled_lp[rows] = picked_lp
        # The sampled token's rank among all tokens: 1 + how many are strictly more likely.
        ranks = ((logprobs > picked_lp[:, None]).sum(dim=-1) + 1).tolist()
        max_k = max(md.num_logprobs[i] for i in rows.tolist())
        top_lp, top_ids = logprobs.topk(max_k, dim=-1) if max_k else (None, None)
        top_lp_l = top_lp.tolist() if max_k else None
        top_ids_l = top_ids.tolist() if max_k else None
        for n, (row, tok, lp) in enumerate(zip(rows.tolist(), picked.tolist(),
                                               picked_lp.tolist())):
            k = md.num_logprobs[row]
            entry = TokenLogprobs(zip(top_ids_l[n][:k], top_lp_l[n][:k])) if k else TokenLogprobs()
            entry[tok] = lp
            entry.sampled_rank = int(ranks[n])
            out[row] = entry


def apply_penalties(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    # logits: [S, V] -> penalized copy; the input is never modified (logprobs read it)
    md = metadata
    if md.penalty_rows is None:
        return logits
    rows = logits[md.penalty_rows]  # [P, V] copy
    if md.prompt_mask is not None:
        seen = md.prompt_mask | (md.output_counts > 0)
        penalty = torch.where(seen, md.repetition_penalty[:, None], 1.0)
        rows = torch.where(rows > 0, rows / penalty, rows * penalty)
    rows = rows - md.frequency_penalty[:, None] * md.output_counts
    rows = rows - md.presence_penalty[:, None] * (md.output_counts > 0).float()
    out = logits.clone()
    out[md.penalty_rows] = rows
    return out


def apply_min_tokens(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    # logits: [S, V] -> copy with the banned (row, token) pairs at -inf
    if metadata.banned is None:
        return logits
    out = logits.clone()
    out[metadata.banned] = float("-inf")
    return out


def apply_token_mask(logits: torch.Tensor, raw: torch.Tensor,
                     metadata: SamplingMetadata) -> torch.Tensor:
    # logits: [S, V] -> the constrained rows' disallowed tokens at -inf (a copy of `raw`,
    # which logprobs read, is made first when no earlier stage copied it)
    if metadata.token_bitmask is None:
        return logits
    out = logits.clone() if logits is raw else logits
    rows, bitmask = metadata.token_bitmask
    if dispatch.use_triton(out):
        apply_token_bitmask(out, rows, bitmask)
    else:
        apply_token_bitmask_ref(out, rows, bitmask)
    return out


def _apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    # logits: [R, V]; top_k: [R] (V = off) -> masked logits [R, V]
    # Same tokens as the sorted path (ties at the k-th value go to the lowest ids), without
    # sorting the vocabulary: torch.topk finds each row's k-th value, then tied tokens fill
    # the places left in id order.
    k = top_k.clamp(max=max_top_k)
    kth = logits.topk(max_top_k, dim=-1).values.gather(1, (k - 1)[:, None])  # [R, 1]
    above = logits > kth
    tied = logits == kth
    room = k[:, None] - above.sum(dim=-1, keepdim=True)
    keep = above | (tied & (tied.cumsum(dim=-1) <= room)) | (top_k[:, None] >= logits.shape[1])
    return logits.masked_fill(~keep, float("-inf"))


def _apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    # logits: [R, V]; top_k: [R] (V = off); top_p: [R] (1.0 = off) -> masked logits [R, V]
    # A stable descending sort puts ties in id order, so top_k=1 and a tiny top_p keep
    # exactly the token argmax picks. Both masks keep sorted position 0: never an empty row.
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    if top_k is not None:
        positions = torch.arange(logits.shape[1], device=logits.device)
        sorted_logits = sorted_logits.masked_fill(positions[None, :] >= top_k[:, None],
                                                  float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # [R, V]
        # Nucleus: keep the smallest prefix whose mass reaches p. Rows with p = 1 keep all,
        # even where rounding pushes the cumulative sum past 1.
        drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
