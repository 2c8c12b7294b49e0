"""Fused sampling: one read of each row's logits gives its token and the token's logprob.

Design: the plain decode batch (temperature only, or greedy) needs, per row, the token
drawn from softmax(logits / T) and log_softmax(logits) at that token. Unfused that is about
eight full [B, V] float32 passes (scale, softmax, noise, clamp, divide, argmax, logsumexp,
gather); here it is one read of the logits.

Sampling is the exponential race in its log form (Gumbel-max): token = argmax_i
logits_i / T - log(E_i) with E_i ~ Exp(1), an exact draw from softmax(logits / T), the same
race the unfused sampler runs as argmax p_i / E_i. Rows with T <= 0 are greedy: argmax of
the logits, ties to the lowest id (as torch.argmax). -inf logits (banned tokens) score -inf
and are never drawn while the row has a finite logit. The logprob is the raw model's:
logits[token] - logsumexp(logits), never temperature-scaled.

Noise: element (row, v) gets a uniform W in (0, 1] from Philox4x32-10 (the key is a 64-bit
seed read from device memory, drawn per step by the caller from its torch.Generator, so no
host sync; the counter is (v // 4, row) and v % 4 picks one of the four outputs, so the
noise does not depend on the launch configuration). W = (r + 0.5) / 2**32 from a uint32 r,
and E = -log(1 - W), by its Taylor series below 1e-2 where 1 - W would round: E resolves
values down to ~1e-10, so tokens with probabilities that small keep their weight. W = 1
(r rounding to 2**32) gives E = inf, a -inf score, never NaN.

`sample_partial_kernel` runs programs (row, split) over contiguous vocabulary splits (many
splits when the batch is small, so every SM streams), each keeping the best score, its
token, and an online (max, sum of exp) of the raw logits; `sample_reduce_kernel` combines a
row's splits (ties to the lower split, hence the lower id) and gathers the token's logit.
Both are deterministic: a seed and logits give the same tokens on every run.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from tritonforge.kernels.dispatch import next_power_of_2

TAYLOR_BELOW = 1e-2  # E = -log(1 - W) by its series below this W (see the module doc)
_MAX_BLOCK_V = 2048
_PROGRAMS_PER_SM = 2


@triton.jit
def _exponential(w):
    # W in (0, 1] -> E = -log(1 - W) ~ Exp(1); the series keeps small E exact (1 - W rounds).
    series = w * (1.0 + w * (0.5 + w * (0.3333333333333333 + w * 0.25)))
    return tl.where(w < 1e-2, series, -tl.log(1.0 - w))


@triton.jit
def sample_partial_kernel(
    logits_ptr, temperature_ptr, seed_ptr, uniform_ptr,
    part_score_ptr, part_token_ptr, part_max_ptr, part_sum_ptr,
    vocab_size, split_size, num_splits,
    stride_lb, stride_ub,
    ALL_GREEDY: tl.constexpr, HAS_UNIFORM: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    v_begin = split * split_size
    v_end = tl.minimum(v_begin + split_size, vocab_size)
    offs_v = tl.arange(0, BLOCK_V)
    offs_q = tl.arange(0, BLOCK_V // 4)
    if not ALL_GREEDY:
        temperature = tl.load(temperature_ptr + row)
        is_greedy = temperature <= 0.0
        temperature = tl.where(is_greedy, 1.0, temperature)
        seed = tl.load(seed_ptr)

    best_score = -float("inf")
    best_token = v_begin
    run_max = -float("inf")
    run_sum = 0.0
    for start_v in range(v_begin, v_end, BLOCK_V):
        cols = start_v + offs_v
        mask = cols < v_end
        x = tl.load(logits_ptr + row * stride_lb + cols, mask=mask,
                    other=-float("inf")).to(tl.float32)
        if ALL_GREEDY:
            score = x
        else:
            if HAS_UNIFORM:
                w = tl.load(uniform_ptr + row * stride_ub + cols, mask=mask, other=0.5)
            else:
                # Philox counter (col // 4, row); output k serves col 4 * (col // 4) + k.
                counter = (start_v // 4 + offs_q).to(tl.int64) | (row << 32)
                r0, r1, r2, r3 = tl.randint4x(seed, counter)
                r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK_V])
                w = (r.to(tl.float32) + 0.5) * 2.3283064365386963e-10
            gumbel = -tl.log(_exponential(w))
            score = tl.where(is_greedy, x, x / temperature + gumbel)
        chunk_score, chunk_arg = tl.max(score, axis=0, return_indices=True,
                                        return_indices_tie_break_left=True)
        take = chunk_score > best_score  # strict: an earlier (lower) id keeps a tie
        best_token = tl.where(take, start_v + chunk_arg, best_token)
        best_score = tl.where(take, chunk_score, best_score)
        # Online logsumexp of the raw logits; a max of -inf (all banned so far) counts as 0.
        new_max = tl.maximum(run_max, tl.max(x, axis=0))
        safe_max = tl.where(new_max == -float("inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - safe_max) + tl.sum(tl.exp(x - safe_max), axis=0)
        run_max = new_max

    part = row * num_splits + split
    tl.store(part_score_ptr + part, best_score)
    tl.store(part_token_ptr + part, best_token)
    tl.store(part_max_ptr + part, run_max)
    tl.store(part_sum_ptr + part, run_sum)


@triton.jit
def sample_reduce_kernel(
    logits_ptr, part_score_ptr, part_token_ptr, part_max_ptr, part_sum_ptr,
    token_out_ptr, logprob_out_ptr,
    vocab_size, num_splits, stride_lb,
    BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    mask = offs_s < num_splits
    part = row * num_splits + offs_s
    score = tl.load(part_score_ptr + part, mask=mask, other=-float("inf"))
    token = tl.load(part_token_ptr + part, mask=mask, other=2147483647)
    best = tl.max(score, axis=0)
    # Splits cover increasing ids, so the smallest tied token is the lowest id overall. The
    # clamp keeps a NaN row's gather in bounds.
    token = tl.min(tl.where(score == best, token, 2147483647), axis=0)
    token = tl.minimum(token, vocab_size - 1)
    run_max = tl.load(part_max_ptr + part, mask=mask, other=-float("inf"))
    run_sum = tl.load(part_sum_ptr + part, mask=mask, other=0.0)
    row_max = tl.max(run_max, axis=0)
    safe_max = tl.where(row_max == -float("inf"), 0.0, row_max)
    total = tl.sum(run_sum * tl.exp(run_max - safe_max), axis=0)
    logsumexp = safe_max + tl.log(total)
    logit = tl.load(logits_ptr + row * stride_lb + token).to(tl.float32)
    tl.store(token_out_ptr + row, token.to(tl.int64))
    tl.store(logprob_out_ptr + row, logit - logsumexp)


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor | None,
    seed: torch.Tensor | None,
    uniform: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `sample_ref`: (token ids [B] int64, raw-logit logprobs of those tokens [B] f32).

    temperature: [B] float32, <= 0 for greedy rows; None: every row greedy (no noise drawn).
    seed: [1] int64 on the logits' device, the Philox key (read in-kernel: no host sync).
    uniform: test-only [B, V] float32 W in (0, 1] replacing the Philox draws.
    num_splits, block_v: launch overrides for tests; the defaults fill the GPU.
    """
    # logits: [B, V] float32 / bfloat16 / float16
    if logits.dim() != 2 or logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits must be [B, V] float32/bfloat16/float16, got "
                         f"{tuple(logits.shape)} {logits.dtype}")
    num_rows, vocab_size = logits.shape
    device = logits.device
    if temperature is not None:
        if temperature.shape != (num_rows,) or temperature.device != device:
            raise ValueError(f"temperature must be [{num_rows}] on {device}, got "
                             f"{tuple(temperature.shape)} on {temperature.device}")
        if uniform is None and (seed is None or seed.numel() != 1 or seed.device != device):
            raise ValueError(f"seed must be a 1-element tensor on {device}")
    if uniform is not None and (uniform.shape != logits.shape or uniform.device != device):
        raise ValueError(f"uniform must be {tuple(logits.shape)} on {device}")
    token_ids = torch.empty(num_rows, dtype=torch.int64, device=device)
    logprobs = torch.empty(num_rows, dtype=torch.float32, device=device)
    if num_rows == 0 or vocab_size == 0:
        return token_ids, logprobs.fill_(float("nan"))
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    all_greedy, has_uniform = temperature is None, uniform is not None
    temperature = temperature.float().contiguous() if temperature is not None else logprobs
    seed = seed.to(torch.int64) if seed is not None else token_ids  # never read when unused
    if has_uniform:
        uniform = uniform.float()
        uniform = uniform if uniform.stride(1) == 1 else uniform.contiguous()
    else:
        uniform = logprobs  # never read

    block_v = block_v or min(_MAX_BLOCK_V, max(next_power_of_2(vocab_size), 64))
    if block_v < 4 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of 2 >= 4, got {block_v}")
    max_splits = triton.cdiv(vocab_size, block_v)
    if num_splits is None:
        num_splits = triton.cdiv(_PROGRAMS_PER_SM * _num_sms(device), num_rows)
    num_splits = max(1, min(num_splits, max_splits))
    # Splits are whole blocks, so every block but the last of a row is full.
    split_size = triton.cdiv(max_splits, num_splits) * block_v
    num_splits = triton.cdiv(vocab_size, split_size)

    parts = torch.empty(4, num_rows * num_splits, dtype=torch.float32, device=device)
    part_token = torch.empty(num_rows * num_splits, dtype=torch.int32, device=device)
    sample_partial_kernel[(num_rows, num_splits)](
        logits, temperature, seed, uniform,
        parts[0], part_token, parts[1], parts[2],
        vocab_size, split_size, num_splits,
        logits.stride(0), uniform.stride(0) if has_uniform else 0,
        ALL_GREEDY=all_greedy, HAS_UNIFORM=has_uniform, BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )
    sample_reduce_kernel[(num_rows,)](
        logits, parts[0], part_token, parts[1], parts[2],
        token_ids, logprobs,
        vocab_size, num_splits, logits.stride(0),
        BLOCK_S=max(next_power_of_2(num_splits), 2), num_warps=1,
    )
    return token_ids, logprobs


def exponential_from_uniform(uniform: torch.Tensor) -> torch.Tensor:
    """E = -log(1 - W) ~ Exp(1) for W in (0, 1], as `_exponential` computes it in-kernel."""
    w = uniform.float()
    series = w * (1.0 + w * (0.5 + w * (1.0 / 3.0 + w * 0.25)))
    return torch.where(w < TAYLOR_BELOW, series, -torch.log(1.0 - w))


def sample_scores_ref(
    logits: torch.Tensor, temperature: torch.Tensor | None, uniform: torch.Tensor | None
) -> torch.Tensor:
    """The race's scores [B, V]: logits for greedy rows (T <= 0, or temperature None), else
    logits / T - log(E) with E = exponential_from_uniform(uniform)."""
    # logits: [B, V]; temperature: [B]; uniform: [B, V] in (0, 1]
    x = logits.float()
    if temperature is None:
        return x
    greedy = (temperature <= 0)[:, None]
    scaled = x / torch.where(greedy, 1.0, temperature.float()[:, None])
    return torch.where(greedy, x, scaled - torch.log(exponential_from_uniform(uniform)))


def sample_ref(
    logits: torch.Tensor,
    temperature: torch.Tensor | None,
    uniform: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [B] int64, logits[token] - logsumexp(logits) [B] float32).

    Tokens are the argmax of `sample_scores_ref` (ties to the lowest id); `uniform` is drawn
    from `generator` as 1 - U[0, 1) when not given.
    """
    # logits: [B, V]; temperature: [B]; uniform: [B, V] in (0, 1]
    x = logits.float()
    if temperature is not None and uniform is None:
        uniform = 1.0 - torch.rand(x.shape, generator=generator, device=x.device)
    token_ids = sample_scores_ref(x, temperature, uniform).argmax(dim=-1)
    logprobs = x.gather(1, token_ids[:, None]).squeeze(1) - x.logsumexp(dim=-1)
    return token_ids, logprobs
