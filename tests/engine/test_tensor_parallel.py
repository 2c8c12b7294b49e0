"""Tensor parallelism on CPU with gloo: real worker processes, real collectives.

The invariant: splitting a model over N ranks changes where the arithmetic happens, not its
result. Greedy tokens at tensor_parallel_size 2 and 4 equal size 1 token for token (fp32,
prompts long enough that prefill is chunked, several sequences in one batch), their log
probabilities agree to float rounding, and pooled outputs match within 1e-5. A rank that
dies takes the group down with an error that names it, at once, never a hang.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from tritonforge.engine import LLM, EngineConfig, SamplingParams
from tritonforge.engine.core_client import EngineCoreClient
from tritonforge.engine.tensor_parallel import NVLS_OFF, TensorParallelGroupDied
from tritonforge.generator.tritonserver import NVLINK_MULTICAST_OFF
from tritonforge.models.layers.parallel_state import TPGroup, building_for, kv_heads_per_rank
from tritonforge.models.weight_utils import iterate_weights, load_model

from tests.engine.test_engine_core import Collector, _wait_gone, assert_turns_dead
from tests.models.test_native_moe import _fused_copy

# Long enough to be chunked by a 48-token budget, short ones decode beside them.
PROMPTS = ["the quick brown fox jumps over the lazy dog " * 7, "hello", "a b c d e f g h i j"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=1)


def _tp_workers(parent: int | None = None) -> list[int]:
    """Pids of the live tensor-parallel workers that `parent` (default: this process) started."""
    parent = os.getpid() if parent is None else parent
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if (int(stat[1]) == parent and stat[0] != "Z"
                and b"tritonforge.engine.tp_worker" in cmdline):
            pids.append(int(entry.name))
    return pids


def _generate(folder: Path, tp: int, model_impl: str) -> tuple[list[list[int]], list[float], int]:
    """(token ids, cumulative logprobs, live workers while loaded) of PROMPTS at size tp."""
    llm = LLM(str(folder), dtype="float32", device="cpu", model_impl=model_impl,
              max_model_len=256, max_num_batched_tokens=48, tensor_parallel_size=tp)
    try:
        workers = len(_tp_workers())
        outputs = llm.generate(PROMPTS, GREEDY)
    finally:
        llm.shutdown()
    return ([o.outputs[0].token_ids for o in outputs],
            [o.outputs[0].cumulative_logprob for o in outputs], workers)


@pytest.mark.parametrize("architecture, model_impl, sizes", [
    ("LlamaForCausalLM", "native", (2, 4)),
    ("Qwen3ForCausalLM", "native", (2, 4)),  # GQA: 2 KV heads, each on 2 ranks at size 4
    ("Gemma2ForCausalLM", "native", (2, 4)),  # soft-capping, sliding windows, sandwich norms
    ("LlamaForCausalLM", "transformers", (2, 4)),  # transformers' own tp_plan
    ("Qwen3MoeForCausalLM", "native", (2,)),  # experts split along their intermediate size
    ("Phi3ForCausalLM", "native", (2,)),  # fused qkv_proj / gate_up_proj checkpoint tensors
    ("GPTNeoXForCausalLM", "transformers", (2,)),  # a fused, head-interleaved qkv
])
def test_greedy_tokens_under_tensor_parallelism_equal_one_rank(tiny_model, architecture,
                                                               model_impl, sizes) -> None:
    folder = tiny_model(architecture)
    want_ids, want_logprobs, _ = _generate(folder, 1, model_impl)
    for tp in sizes:
        ids, logprobs, workers = _generate(folder, tp, model_impl)
        assert workers == tp - 1
        assert ids == want_ids, tp
        assert logprobs == pytest.approx(want_logprobs, abs=1e-3), tp
    assert not _tp_workers()  # shutdown() stopped every worker


def test_each_rank_holds_its_share_of_the_split_layers(tiny_model) -> None:
    """The shards really are split (equal outputs from whole copies would prove nothing)."""
    llm = LLM(str(tiny_model("Qwen3ForCausalLM")), dtype="float32", device="cpu",
              max_model_len=256, tensor_parallel_size=4)
    try:
        attn = llm.apply_model(lambda m: m.model.layers[0].self_attn)
        # 4 query heads, 2 KV heads of 32: one query head and one (replicated) KV head each
        assert attn.qkv_proj.weight.shape[0] == (1 + 2 * 1) * 32
        assert attn.attn.num_kv_heads == 1 and llm.engine.runner.num_kv_heads == 1
        down = llm.apply_model(lambda m: m.model.layers[0].mlp.down_proj)
        assert down.weight.shape[1] == down.input_size // 4
    finally:
        llm.shutdown()


@pytest.mark.parametrize("architecture", ["BertModel", "BertForSequenceClassification"])
def test_pooled_outputs_at_tp_2_and_4_match_tp_1(tiny_model, architecture) -> None:
    texts = ["hello world", "the quick brown fox jumps over the lazy dog", "a", "b c"] * 3

    def pooled(tp: int) -> torch.Tensor:
        llm = LLM(str(tiny_model(architecture)), dtype="float32", device="cpu",
                  tensor_parallel_size=tp)
        try:
            if llm.pooler.task == "embed":
                return torch.tensor([o.outputs.embedding for o in llm.embed(texts)])
            return torch.tensor([o.outputs.probs for o in llm.classify(texts)])
        finally:
            llm.shutdown()

    want = pooled(1)
    for tp in (2, 4):
        torch.testing.assert_close(pooled(tp), want, atol=1e-5, rtol=0)


def test_a_killed_worker_ends_the_group_with_an_error_naming_it(tiny_model) -> None:
    llm = LLM(str(tiny_model("Qwen3ForCausalLM")), dtype="float32", device="cpu",
              max_model_len=256, tensor_parallel_size=2)
    try:
        assert llm.generate(["hi"], GREEDY)[0].outputs[0].token_ids
        (worker,) = _tp_workers()
        os.kill(worker, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(TensorParallelGroupDied, match=r"rank 1 .*signal SIGKILL"):
            llm.generate(["hi there"], GREEDY)
        with pytest.raises(TensorParallelGroupDied, match="rank 1"):  # and stays down
            llm.generate(["again"], GREEDY)
        assert time.monotonic() - start < 10
        assert llm.engine.fatal_error is not None
    finally:
        llm.shutdown()
    assert not _tp_workers()


def test_a_rank_that_cannot_build_its_shard_fails_the_load_and_leaves_no_worker(
        tiny_model) -> None:
    # 4 query heads cannot be split over 3 ranks.
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) is not divisible by "
                                         r"tensor_parallel_size \(3\)"):
        LLM(str(tiny_model("LlamaForCausalLM")), dtype="float32", device="cpu",
            max_model_len=256, tensor_parallel_size=3)
    assert not _tp_workers()


@pytest.mark.parametrize("architecture, model_impl, message", [
    ("OlmoeForCausalLM", "native", "OlmoeForCausalLM does not support tensor_parallel_size"),
    ("GptOssForCausalLM", "native", "GptOssForCausalLM does not support tensor_parallel_size"),
    ("DeepseekV2ForCausalLM", "native",
     "DeepseekV2ForCausalLM does not support tensor_parallel_size"),
    ("OPTForCausalLM", "auto", "no tensor-parallel plan"),
])
def test_models_that_cannot_be_split_are_refused_by_name(tiny_model, architecture, model_impl,
                                                         message) -> None:
    with pytest.raises(ValueError, match=message):
        LLM(str(tiny_model(architecture)), dtype="float32", device="cpu", max_model_len=256,
            model_impl=model_impl, tensor_parallel_size=2)
    assert not _tp_workers()


def test_the_engine_core_of_a_group_reports_a_dead_rank_to_its_front_end(tiny_model,
                                                                           tmp_path) -> None:
    """Served (the engine core process is rank 0): a worker killed while the core idles
    turns the front end unhealthy (the backend then reports the model not ready) and fails
    later requests at once, naming the rank."""
    config = EngineConfig(model=str(tiny_model("Qwen3ForCausalLM")), device="cpu",
                          dtype="float32", max_model_len=256, tensor_parallel_size=2)
    client = EngineCoreClient(config, runtime_dir=tmp_path / "rt", owner_pid=os.getpid())
    try:
        ids = client.tokenizer("served")["input_ids"]
        first = Collector()
        client.add_request("0", ids, SamplingParams(max_tokens=4, ignore_eos=True),
                           callback=first)
        assert first.wait().error is None and first.outputs[-1].finished
        core = client.info.pid
        (worker,) = _tp_workers(core)
        os.kill(worker, signal.SIGKILL)
        assert_turns_dead(client, ids, within=10)
        assert _wait_gone(core, 15)
    finally:
        client.shutdown()


def test_every_started_rank_keeps_nvlink_multicast_off(tiny_model) -> None:
    # The engine may not import the generator: the two copies of the list must agree.
    assert NVLS_OFF == NVLINK_MULTICAST_OFF
    llm = LLM(str(tiny_model("LlamaForCausalLM")), dtype="float32", device="cpu",
              max_model_len=256, tensor_parallel_size=2)
    try:
        (worker,) = _tp_workers()
        environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
        for key, value in NVLS_OFF.items():
            assert f"{key}={value}".encode() in environ
            assert os.environ[key] == value  # rank 0 is this process
    finally:
        llm.shutdown()


# ---- shard math, one rank at a time (no processes: loading runs no collective) ------------

def test_kv_heads_are_split_while_there_are_enough_else_replicated() -> None:
    assert [kv_heads_per_rank(8, n) for n in (1, 2, 4, 8)] == [8, 4, 2, 1]
    assert [kv_heads_per_rank(2, n) for n in (2, 4, 8)] == [1, 1, 1]
    with pytest.raises(ValueError, match="num_key_value_heads"):
        kv_heads_per_rank(6, 4)


def test_fused_expert_tensors_split_like_per_expert_tensors(tiny_model, tmp_path) -> None:
    """transformers 5's fused experts ([E, 2I, H] gate_up, [E, H, I] down) give every rank
    the same slices as the Hub's per-expert tensors, and rank r holds the r-th block of
    every expert's intermediate dimension."""
    folder = tiny_model("Qwen3MoeForCausalLM")
    fused = _fused_copy(folder, tmp_path / "fused")
    assert "model.layers.1.mlp.experts.gate_up_proj" in {n for n, _ in iterate_weights(fused)}
    whole, _ = load_model(folder, torch.float32, "cpu", "native")
    whole = dict(whole.named_parameters())
    for rank in range(2):
        with building_for(TPGroup(rank, 2, device_group=object())):
            per_expert, _ = load_model(folder, torch.float32, "cpu", "native")
            joined, _ = load_model(fused, torch.float32, "cpu", "native")
        for (name, a), (_, b) in zip(per_expert.named_parameters(), joined.named_parameters()):
            assert torch.equal(a, b), name
        ours = dict(per_expert.named_parameters())
        down = whole["model.layers.1.mlp.experts.down_proj"]  # [E, H, I]
        half = down.shape[2] // 2
        assert torch.equal(ours["model.layers.1.mlp.experts.down_proj"],
                           down[:, :, rank * half:(rank + 1) * half])
        gate_up = whole["model.layers.1.mlp.experts.gate_up_proj"]  # [E, 2I, H]: gate | up
        gate, up = gate_up.chunk(2, dim=1)
        want = torch.cat([gate[:, rank * half:(rank + 1) * half],
                          up[:, rank * half:(rank + 1) * half]], dim=1)
        assert torch.equal(ours["model.layers.1.mlp.experts.gate_up_proj"], want)
