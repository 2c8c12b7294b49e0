"""The generate engine end to end on CPU: greedy tokens equal transformers', batching and
chunking and preemption change nothing, prefix caching reuses blocks, aborts free every
block, and seeded sampling depends only on the request."""

from __future__ import annotations

import random

import pytest
from tritonforge.engine import LLM, SamplingParams

from tests.fixtures.hf_reference import hf_greedy

ARCHITECTURES = ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                 "MistralForCausalLM"]

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Paged attention stores keys and values in fixed-size blocks",
    "你好，世界 🙂",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 4,
]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_greedy_tokens_equal_transformers_generate(tiny_model, architecture):
    folder = tiny_model(architecture)
    llm = LLM(model=folder, runner="generate", device="cpu", dtype="float32",
              max_model_len=512)
    params = SamplingParams(temperature=0.0, max_tokens=24)
    outputs = llm.generate(PROMPTS, params)
    eos = llm.engine.eos_token_ids
    for prompt, out in zip(PROMPTS, outputs):
        expected = hf_greedy(folder, out.prompt_token_ids, 24, eos)
        assert out.outputs[0].token_ids == expected, prompt
        assert out.outputs[0].finish_reason in {"stop", "length"}
        assert out.outputs[0].text == llm.tokenizer.decode(
            [t for t in expected if t not in eos], skip_special_tokens=True)


def test_same_tokens_alone_and_in_a_batch_with_small_chunks_and_preemption(tiny_model):
    folder = tiny_model("Qwen3ForCausalLM")
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(["alpha", "beta", "gamma", "delta", "ε", "🙂"])
                        for _ in range(rng.randint(1, 120))) for _ in range(32)]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 40), ignore_eos=True)
              for _ in prompts]
    alone_llm = LLM(model=folder, device="cpu", max_model_len=512)
    alone = [alone_llm.generate(p, sp)[0].outputs[0].token_ids
             for p, sp in zip(prompts, params)]
    # 48 blocks of 16 tokens cannot hold 32 growing sequences: preemption must happen.
    small = LLM(model=folder, device="cpu", max_model_len=512, max_num_batched_tokens=64,
                num_kv_blocks=48, max_num_seqs=32)
    batched = small.generate(prompts, params)
    assert small.engine.stats().num_preemptions > 0
    assert [b.outputs[0].token_ids for b in batched] == alone
    assert small.engine.block_manager.num_used_blocks == 0


def test_prefix_cache_reuses_blocks_and_changes_nothing(tiny_model):
    folder = tiny_model("LlamaForCausalLM")
    system = "You are a helpful assistant that answers briefly. " * 6
    prompts = [system + q for q in ["What is a block?", "Why cache?", "How big?"]]
    params = SamplingParams(temperature=0.0, max_tokens=12)
    cached = LLM(model=folder, device="cpu", max_model_len=512)
    first = cached.generate(prompts[:1], params)
    hits_before = cached.engine.stats().prefix_cache_hits
    rest = cached.generate(prompts[1:], params)
    stats = cached.engine.stats()
    assert stats.prefix_cache_hits - hits_before >= 2 * 16 * 3  # 3+ shared blocks, twice
    assert all(out.num_cached_tokens >= 48 for out in rest)
    uncached = LLM(model=folder, device="cpu", max_model_len=512, enable_prefix_caching=False)
    reference = uncached.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in first + rest] == [
        o.outputs[0].token_ids for o in reference]


def test_every_block_is_free_after_100_requests_with_30_aborted_mid_stream(tiny_model):
    llm = LLM(model=tiny_model("Qwen2ForCausalLM"), device="cpu", max_model_len=256,
              max_num_batched_tokens=128, num_kv_blocks=64, max_num_seqs=16)
    engine = llm.engine
    rng = random.Random(1)
    ids = [engine.add_request(None, "token " * rng.randint(1, 60),
                              SamplingParams(max_tokens=rng.randint(5, 30), ignore_eos=True,
                                             seed=i))
           for i in range(100)]
    to_abort = set(rng.sample(ids, 30))
    abort_after = {rid: rng.randint(0, 6) for rid in to_abort}  # outputs before the abort
    seen: dict[str, int] = {}
    aborted = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id] = seen.get(out.request_id, 0) + 1
        for rid in list(to_abort):
            if seen.get(rid, 0) >= abort_after[rid]:
                out = engine.abort_request(rid)
                to_abort.discard(rid)
                if out is not None:
                    assert out.finished and out.outputs[0].finish_reason == "abort"
                    aborted += 1
    assert aborted >= 20  # most were still running when aborted
    assert engine.block_manager.num_used_blocks == 0
    assert engine.stats().kv_cache_usage == 0.0
    assert engine.scheduler.num_running == engine.scheduler.num_waiting == 0


def test_seeded_sampling_depends_only_on_the_request(tiny_model):
    llm = LLM(model=tiny_model("LlamaForCausalLM"), device="cpu", max_model_len=256)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20,
                            ignore_eos=True)
    alone = llm.generate("Sampling with a seed", seeded)[0].outputs[0].token_ids
    crowd = [SamplingParams(temperature=0.8, max_tokens=rng_len, ignore_eos=True)
             for rng_len in (3, 25, 7, 12)]
    mixed = llm.generate(["other", "Sampling with a seed", "more text here", "x", "y"],
                         [crowd[0], seeded, crowd[1], crowd[2], crowd[3]])
    assert mixed[1].outputs[0].token_ids == alone
    reordered = llm.generate(["Sampling with a seed", "zzz"], [seeded, crowd[1]])
    assert reordered[0].outputs[0].token_ids == alone
    other_seed = llm.generate("Sampling with a seed",
                              SamplingParams(temperature=1.0, top_p=0.9, seed=99,
                                             max_tokens=20, ignore_eos=True))
    assert other_seed[0].outputs[0].token_ids != alone


def test_stop_strings_end_the_text_before_the_stop(tiny_model):
    llm = LLM(model=tiny_model("LlamaForCausalLM"), device="cpu", max_model_len=256)
    free = llm.generate("Tell me", SamplingParams(temperature=0.0, max_tokens=30,
                                                  ignore_eos=True))[0].outputs[0]
    assert len(free.text) > 6
    stop = free.text[3:6]
    stopped = llm.generate("Tell me", SamplingParams(temperature=0.0, max_tokens=30,
                                                     ignore_eos=True, stop=[stop]))
    out = stopped[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free.text[: free.text.index(stop)]


def test_logprobs_hold_the_sampled_token_per_step(tiny_model):
    llm = LLM(model=tiny_model("Qwen3ForCausalLM"), device="cpu", max_model_len=256)
    out = llm.generate("logprobs please", SamplingParams(temperature=0.0, max_tokens=6,
                                                         logprobs=3, ignore_eos=True))[0]
    completion = out.outputs[0]
    assert len(completion.logprobs) == len(completion.token_ids) == 6
    for token, step in zip(completion.token_ids, completion.logprobs):
        assert token in step and len(step) >= 3
        assert step[token] == max(step.values())  # greedy picks the most likely token
    assert completion.cumulative_logprob == pytest.approx(
        sum(step[t] for t, step in zip(completion.token_ids, completion.logprobs)), abs=1e-4)


def test_chat_renders_the_template(tiny_model):
    llm = LLM(model=tiny_model("Qwen3ForCausalLM"), device="cpu", max_model_len=256)
    messages = [{"role": "user", "content": "Hi there"}]
    out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=4))[0]
    expected = llm.tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
    assert out.prompt == expected
    assert out.prompt_token_ids == llm.tokenizer(expected, add_special_tokens=False)["input_ids"]


def test_bad_prompts_fail_alone_and_leak_nothing(tiny_model):
    llm = LLM(model=tiny_model("LlamaForCausalLM"), device="cpu", max_model_len=64)
    with pytest.raises(ValueError, match=r"prompts\[1\].*max_model_len"):
        llm.generate(["fine", "word " * 200], SamplingParams(max_tokens=4))
    assert llm.engine.block_manager.num_used_blocks == 0
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate("fine", SamplingParams(max_tokens=500))
    assert llm.generate("fine", SamplingParams(max_tokens=2))[0].outputs[0].token_ids
