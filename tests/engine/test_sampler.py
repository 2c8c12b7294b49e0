"""Sampler: greedy is argmax, filters keep what they promise, penalties and min_tokens change
exactly the expected logits, logprobs describe the raw model, seeded rows are independent of
the batch, and temperature sampling draws from softmax(logits / T)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor
from tritonforge.engine import sampler as sampler_module
from tritonforge.engine.sampler import (
    Sampler,
    SamplingMetadata,
    _apply_top_k,
    _apply_top_k_top_p,
    apply_min_tokens,
    apply_penalties,
    request_generator,
)
from tritonforge.engine.sampling_metadata import GREEDY, UniformSamplingMetadata
from tritonforge.engine.sampling_params import SamplingParams
from tritonforge.kernels import dispatch

V = 64
EOS = 7


def run(
    logits: torch.Tensor,
    params: list[SamplingParams],
    *,
    sampler: Sampler | None = None,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    generators: list[torch.Generator | None] | None = None,
    eos: set[int] = frozenset({EOS}),
):
    n = len(params)
    md = SamplingMetadata.build(
        params, prompts or [[1, 2, 3]] * n, outputs or [[]] * n,
        generators if generators is not None else [request_generator(p, "cpu") for p in params],
        eos, logits.shape[1], "cpu",
    )
    return (sampler or Sampler(seed=0))(logits, md), md


def test_greedy_equals_argmax():
    torch.manual_seed(0)
    logits = torch.randn(16, V)
    logits[3, :] = 0.0  # all tied: argmax takes the lowest id
    out, _ = run(logits, [SamplingParams(temperature=0.0)] * 16)
    assert out.token_ids == logits.argmax(-1).tolist()


def test_greedy_rows_stay_argmax_in_a_mixed_batch():
    torch.manual_seed(1)
    logits = torch.randn(9, V)
    params = [SamplingParams(temperature=0.0 if i % 3 else 1.0, seed=i if i % 2 else None)
              for i in range(9)]
    out, _ = run(logits, params)
    for i in range(9):
        if i % 3:
            assert out.token_ids[i] == int(logits[i].argmax())


@pytest.mark.parametrize("seed", [None, 5])
def test_top_k_1_equals_greedy(seed):
    torch.manual_seed(2)
    logits = torch.randn(8, V) * 3
    logits[0, 10] = logits[0, 20] = logits[0].max() + 1  # a tie: greedy takes 10
    out, _ = run(logits, [SamplingParams(temperature=1.3, top_k=1, seed=seed)] * 8)
    assert out.token_ids == logits.argmax(-1).tolist()


def test_tiny_top_p_equals_greedy():
    torch.manual_seed(3)
    logits = torch.randn(8, V)
    logits[1, 5] = logits[1, 9] = logits[1].max() + 0.5
    out, _ = run(logits, [SamplingParams(temperature=2.0, top_p=1e-6)] * 8)
    assert out.token_ids == logits.argmax(-1).tolist()


PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def _draws(params: SamplingParams, num: int = 2000, probs: torch.Tensor = PROBS) -> torch.Tensor:
    """num draws of one row, as a batch of identical rows (one vectorized call)."""
    logits = probs.log().repeat(num, 1)
    out, _ = run(logits, [params] * num, sampler=Sampler(seed=123))
    return torch.tensor(out.token_ids)


def test_top_k_fast_path_keeps_the_same_tokens_as_the_sorted_path():
    torch.manual_seed(8)
    logits = torch.randint(-3, 4, (32, V)).float()  # many ties at every k-th value
    logits[5] = float("-inf")
    logits[5, :3] = 0.0  # fewer finite tokens than k
    top_k = torch.randint(1, 40, (32,))
    top_k[::7] = V  # off
    fast = _apply_top_k(logits, top_k, int(top_k[top_k < V].max()))
    assert torch.equal(fast, _apply_top_k_top_p(logits, top_k, None))
    kept = (fast > float("-inf")).sum(-1)
    assert all(kept[i] == (V if top_k[i] == V else min(top_k[i], 3 if i == 5 else V))
               for i in range(32) if i % 7)


def test_top_k_keeps_only_the_k_most_likely():
    assert set(_draws(SamplingParams(top_k=2)).tolist()) == {0, 1}


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    assert set(_draws(SamplingParams(top_p=0.7)).tolist()) == {0, 1}
    assert set(_draws(SamplingParams(top_p=0.85)).tolist()) == {0, 1, 2}


def test_min_p_drops_tokens_below_fraction_of_top():
    # threshold 0.5 * 0.5 = 0.25: 0.3 stays, 0.15 and 0.05 go
    assert set(_draws(SamplingParams(min_p=0.5)).tolist()) == {0, 1}
    assert set(_draws(SamplingParams(min_p=0.05)).tolist()) == {0, 1, 2, 3}


def test_temperature_sampling_matches_softmax_over_5000_draws():
    logits = torch.tensor([1.0, 0.5, 0.0, -1.0])
    for temperature in (1.0, 0.6):
        draws = _draws(SamplingParams(temperature=temperature), 5000, logits.softmax(-1))
        freq = torch.bincount(draws, minlength=4).float() / 5000
        expected = (logits / temperature).softmax(-1)
        sigma = (expected * (1 - expected) / 5000).sqrt()
        assert ((freq - expected).abs() <= 4 * sigma + 1e-3).all(), (freq, expected)


def test_seeded_row_draws_follow_softmax_too():
    logits = torch.tensor([[1.0, 0.5, 0.0, -1.0]])
    params = SamplingParams(temperature=1.0, seed=99)
    generator = request_generator(params, "cpu")
    sampler = Sampler()
    tokens = [run(logits, [params], sampler=sampler, generators=[generator])[0].token_ids[0]
              for _ in range(2000)]
    freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / 2000
    expected = logits[0].softmax(-1)
    assert ((freq - expected).abs() <= 4 * (expected * (1 - expected) / 2000).sqrt()).all()


def test_top_k_and_temperature_renormalize_over_the_kept_tokens():
    logits = torch.tensor([1.0, 0.5, 0.0, -1.0])
    draws = _draws(SamplingParams(temperature=0.8, top_k=3), 5000, logits.softmax(-1))
    freq = torch.bincount(draws, minlength=4).float() / 5000
    expected = torch.cat([(logits[:3] / 0.8).softmax(-1), torch.zeros(1)])
    assert freq[3] == 0 and ((freq - expected).abs() < 0.03).all()


def test_penalties_change_exactly_the_expected_logits():
    torch.manual_seed(4)
    logits = torch.randn(3, V) * 2
    prompt, output = [1, 2, 2, 60], [2, 3, 3, 3, 9]
    params = [
        SamplingParams(repetition_penalty=1.7, presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(),
        SamplingParams(presence_penalty=-1.0),
    ]
    md = SamplingMetadata.build(params, [prompt] * 3, [output] * 3, [None] * 3, {EOS}, V, "cpu")
    before = logits.clone()
    got = apply_penalties(logits, md)

    expected = logits.clone()
    # Repetition: HF's own processor over prompt + output.
    hf = RepetitionPenaltyLogitsProcessor(1.7)
    expected[0] = hf(torch.tensor([prompt + output]), logits[0:1].clone())[0]
    counts = torch.bincount(torch.tensor(output), minlength=V).float()
    expected[0] -= 0.25 * counts + 0.5 * (counts > 0).float()
    expected[2] += 1.0 * (counts > 0).float()  # presence only, over output tokens only
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    changed = (got != logits).nonzero()[:, 1].unique().tolist()
    assert set(changed) <= {1, 2, 3, 9, 60}
    assert torch.equal(logits, before)  # the raw logits stay raw: logprobs read them


def test_penalties_ignore_token_ids_outside_the_vocab():
    logits = torch.zeros(1, V)
    md = SamplingMetadata.build([SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0)],
                                [[V + 5, -1, 4]], [[V, 4]], [None], {EOS}, V, "cpu")
    got = apply_penalties(logits + 1.0, md)
    assert (got[0, :4] == 1.0).all() and got[0, 4] == pytest.approx(0.5 - 1.0)


def test_min_tokens_bans_eos_and_stop_tokens_until_reached():
    logits = torch.zeros(4, V)
    logits[:, EOS] = 10.0
    logits[:, 11] = 9.0
    logits[:, 12] = 8.0
    params = [
        SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[11]),  # 2 outputs: banned
        SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[11]),  # 3 outputs: free
        SamplingParams(temperature=0, min_tokens=3, ignore_eos=True),  # EOS is no stop
        SamplingParams(temperature=0.5, min_tokens=3, stop_token_ids=[11]),
    ]
    outs = [[5, 5], [5, 5, 5], [5], [5]]
    out, md = run(logits, params, outputs=outs)
    assert out.token_ids[:3] == [12, EOS, EOS] and out.token_ids[3] not in (EOS, 11)
    banned = apply_min_tokens(logits, md)
    assert banned[0, EOS] == banned[0, 11] == float("-inf") and banned[0, 12] == 8.0
    assert logits[0, EOS] == 10.0  # the input stays raw


def test_min_tokens_bans_every_eos_id():
    logits = torch.zeros(1, V)
    logits[0, [3, EOS]] = 5.0
    out, _ = run(logits, [SamplingParams(temperature=0, min_tokens=1)], eos={3, EOS})
    assert out.token_ids[0] not in (3, EOS)


def test_logprobs_hold_the_sampled_token_and_match_raw_log_softmax():
    torch.manual_seed(5)
    logits = torch.randn(4, V) * 2
    params = [
        SamplingParams(temperature=0.7, top_k=5, logprobs=3, repetition_penalty=1.3, seed=1),
        SamplingParams(temperature=0, logprobs=0),
        SamplingParams(),
        SamplingParams(temperature=1.5, logprobs=20, presence_penalty=1.0),
    ]
    out, _ = run(logits, params, outputs=[[4, 5], [], [], [6]])
    raw = logits.log_softmax(-1)
    assert out.logprobs[2] is None
    for row, k in ((0, 3), (1, 0), (3, 20)):
        entry = out.logprobs[row]
        token = out.token_ids[row]
        assert token in entry and len(entry) in (k, k + 1)
        top = raw[row].topk(k).indices.tolist() if k else []
        assert set(top) <= set(entry)
        for tid, lp in entry.items():
            assert lp == pytest.approx(raw[row, tid].item(), abs=1e-5)
        assert out.sampled_logprobs[row] == entry[token]
        # vLLM's rank: 1 + the tokens strictly more likely than the sampled one
        assert entry.sampled_rank == int((raw[row] > raw[row, token]).sum()) + 1
    for row in range(4):
        assert out.sampled_logprobs[row] == pytest.approx(
            raw[row, out.token_ids[row]].item(), abs=1e-5)


def _seeded_run(order: list[int], rows: list[SamplingParams], logits: list[torch.Tensor],
                steps: int, sampler_seed: int) -> dict[int, list[int]]:
    """Run `steps` steps of the rows in `order`; returns each row's tokens by row index."""
    generators = {i: request_generator(rows[i], "cpu") for i in order}
    sampler = Sampler(seed=sampler_seed)
    tokens: dict[int, list[int]] = {i: [] for i in order}
    for step in range(steps):
        batch = torch.stack([logits[i][step] for i in order])
        out, _ = run(batch, [rows[i] for i in order], sampler=sampler,
                     generators=[generators[i] for i in order],
                     outputs=[tokens[i] for i in order])
        for i, tok in zip(order, out.token_ids):
            tokens[i].append(tok)
    return tokens


def test_seeded_rows_reproduce_whatever_the_batch_and_its_order():
    torch.manual_seed(6)
    steps = 12
    rows = [
        SamplingParams(temperature=0.9, top_p=0.9, seed=1234),  # the rows under test: 0, 1
        SamplingParams(temperature=1.2, top_k=20, min_p=0.01, presence_penalty=0.3, seed=7),
        SamplingParams(temperature=1.0),  # neighbours: unseeded, greedy, another seed
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.5, seed=1234),
        SamplingParams(temperature=1.1, top_p=0.5),
    ]
    logits = [torch.randn(steps, V) for _ in rows]
    alone = {i: _seeded_run([i], rows, logits, steps, sampler_seed=0)[i] for i in (0, 1)}
    for trial in range(4):
        order = list(range(len(rows)))
        random.Random(trial).shuffle(order)
        mixed = _seeded_run(order, rows, logits, steps, sampler_seed=trial)
        assert mixed[0] == alone[0] and mixed[1] == alone[1]
    assert len(set(alone[0])) > 1  # the rows really sample


def test_unseeded_rows_differ_across_draws():
    logits = torch.zeros(1, 1000)
    sampler = Sampler(seed=0)
    tokens = [run(logits, [SamplingParams()], sampler=sampler)[0].token_ids[0]
              for _ in range(20)]
    assert len(set(tokens)) > 15


def test_engine_seed_makes_unseeded_rows_reproducible():
    logits = torch.zeros(8, 1000)
    a, _ = run(logits, [SamplingParams()] * 8, sampler=Sampler(seed=42))
    b, _ = run(logits, [SamplingParams()] * 8, sampler=Sampler(seed=42))
    c, _ = run(logits, [SamplingParams()] * 8, sampler=Sampler(seed=43))
    assert a.token_ids == b.token_ids != c.token_ids


def test_metadata_skips_stages_no_row_uses():
    md = SamplingMetadata.build([SamplingParams()] * 3, [[1]] * 3, [[]] * 3, [None] * 3,
                                {EOS}, V, "cpu")
    assert md.all_random and md.top_k is None and md.top_p is None and md.min_p is None
    assert md.penalty_rows is None and md.banned is None and md.logprob_rows is None
    assert not md.seeded


def test_bad_shapes_are_value_errors():
    md = SamplingMetadata.build([SamplingParams()], [[1]], [[]], [None], {EOS}, V, "cpu")
    with pytest.raises(ValueError, match="logits must be"):
        Sampler()(torch.zeros(2, V), md)
    with pytest.raises(ValueError, match="one entry per row"):
        SamplingMetadata.build([SamplingParams()], [[1], [2]], [[]], [None], {EOS}, V, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sampler_matches_argmax_and_reproduces_seeds():
    torch.manual_seed(7)
    logits = torch.randn(6, V, device="cuda")
    params = [SamplingParams(temperature=0)] * 3 + [SamplingParams(seed=3, top_p=0.9)] * 3
    outs = []
    for _ in range(2):
        gens = [request_generator(p, "cuda") for p in params]
        md = SamplingMetadata.build(params, [[1]] * 6, [[]] * 6, gens, {EOS}, V, "cuda")
        outs.append(Sampler(device="cuda")(logits, md).token_ids)
    assert outs[0][:3] == logits[:3].argmax(-1).tolist() and outs[0] == outs[1]


# --- the fused path (kernels/sampling.py) -------------------------------------------------------
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"
NOT_PLAIN = [
    SamplingParams(top_k=5), SamplingParams(top_p=0.9), SamplingParams(min_p=0.1),
    SamplingParams(presence_penalty=0.5), SamplingParams(repetition_penalty=1.2),
    SamplingParams(min_tokens=4), SamplingParams(seed=3), SamplingParams(logprobs=2),
    SamplingParams(temperature=0.0, logprobs=0),
]


def _metadata(params: list[SamplingParams], vocab: int = V, device: str = "cpu"):
    return SamplingMetadata.build(params, [[1, 2]] * len(params), [[]] * len(params),
                                  [request_generator(p, device) for p in params], {EOS},
                                  vocab, device)


def test_fused_path_is_taken_only_for_plain_batches_on_cuda():
    logits = torch.zeros(3, V)
    plain = [[SamplingParams(temperature=0.6)] * 3, [SamplingParams(temperature=0.0)] * 3,
             [SamplingParams(temperature=0.0), SamplingParams(temperature=1.3),
              SamplingParams(temperature=0.7, max_tokens=3, stop=["x"], ignore_eos=True)]]
    for params in plain:
        md = _metadata(params)
        assert md.is_plain
        assert not Sampler().uses_fused_path(logits, md)  # CPU: dispatch says reference
        assert Sampler(fused=True).uses_fused_path(logits, md)
        assert not Sampler(fused=False).uses_fused_path(logits, md)
        assert not Sampler(fused=True).uses_fused_path(logits.double(), md)
    uniform = UniformSamplingMetadata("cpu")
    assert uniform.build(3, 0.6, V).is_plain and uniform.build(3, GREEDY, V).is_plain
    for odd in NOT_PLAIN:
        md = _metadata([SamplingParams(temperature=0.8), odd, SamplingParams(temperature=0.0)])
        assert not md.is_plain, odd
        assert not Sampler(fused=True).uses_fused_path(logits, md), odd
    if HAS_CUDA:
        md = _metadata(plain[0], device="cuda")
        assert Sampler(device="cuda").uses_fused_path(logits.cuda(), md)
        with dispatch.force_reference():
            assert not Sampler(device="cuda").uses_fused_path(logits.cuda(), md)


def test_cpu_sampler_never_launches_the_fused_kernel(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the fused kernel ran on CPU")

    monkeypatch.setattr(sampler_module, "fused_sample", boom)
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(0))
    for params in ([SamplingParams(temperature=0.6)] * 5, [SamplingParams(temperature=0)] * 5):
        out, _ = run(logits, params)
        assert len(out.token_ids) == 5


fused_kernel_test = pytest.mark.skipif(
    not (INTERPRETED or HAS_CUDA),
    reason="CPU without TRITON_INTERPRET=1: run by test_fused_sampler_under_the_interpreter",
)


@fused_kernel_test
def test_fused_sampler_end_to_end_draws_tokens_and_raw_logprobs():
    gen = torch.Generator().manual_seed(11)
    num_rows, vocab = 17, 1000
    logits = torch.randn(num_rows, vocab, generator=gen) * 3
    logits[:, 500:] = float("-inf")  # banned: never drawn, even hot
    logits[4] = 0.0
    logits[4, [9, 700]] = 5.0  # a greedy tie
    logits = logits.to(KERNEL_DEVICE)
    params = [SamplingParams(temperature=0.0 if i % 4 == 0 else 0.5 + i / 4)
              for i in range(num_rows)]
    md = _metadata(params, vocab, KERNEL_DEVICE)
    expected_lp = logits.double().log_softmax(-1)
    results = []
    for seed in (0, 0, 1):
        sampler = Sampler(seed=seed, device=KERNEL_DEVICE, fused=True)
        assert sampler.uses_fused_path(logits, md)
        out = sampler(logits, md)
        assert out.logprobs == [None] * num_rows
        for i, (tok, lp) in enumerate(zip(out.token_ids, out.sampled_logprobs)):
            if i % 4 == 0:
                assert tok == int(logits[i].argmax())
            assert tok < 500 or i == 4
            assert lp == pytest.approx(expected_lp[i, tok].item(), abs=1e-5)
        assert out.token_ids[4] == 9
        results.append(out.token_ids)
    assert results[0] == results[1] != results[2]  # the engine seed reproduces the draws
    uniform = UniformSamplingMetadata(KERNEL_DEVICE)
    for temperature in (GREEDY, 0.6):
        out = Sampler(seed=2, device=KERNEL_DEVICE, fused=True)(
            logits, uniform.build(num_rows, temperature, vocab))
        assert all(t < 500 or i == 4 for i, t in enumerate(out.token_ids))
        if temperature == GREEDY:
            assert out.token_ids == logits.argmax(-1).tolist()


@fused_kernel_test
def test_fused_sampler_draws_follow_softmax():
    logits = torch.tensor([1.0, 0.5, 0.0, -1.0])
    num = 800
    md = UniformSamplingMetadata(KERNEL_DEVICE).build(num, 0.6, 4)
    out = Sampler(seed=5, device=KERNEL_DEVICE, fused=True)(
        logits.repeat(num, 1).to(KERNEL_DEVICE), md)
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=4).float() / num
    expected = (logits / 0.6).softmax(-1)
    assert ((freq - expected).abs() <= 4 * (expected * (1 - expected) / num).sqrt()).all()


@pytest.mark.skipif(INTERPRETED or HAS_CUDA, reason="the fused tests run in-process here")
def test_fused_sampler_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
         "-k", "fused_sampler and not under_the_interpreter"],
        check=False, cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True,
        text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "2 passed" in output, output[-6000:]
