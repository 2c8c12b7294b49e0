"""The engine core process and its front-end client: outputs through the core equal the
in-process engine's token for token and character for character (greedy, seeded sampling,
stop strings, logprobs), front ends share one core, a front end that leaves frees its
blocks, a core that dies fails every request in flight at once, and no core outlives the
process it serves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from tritonforge.engine import EngineConfig, LLMEngine, SamplingParams
from tritonforge.engine.async_engine import EngineDeadError
from tritonforge.engine.core import EngineCore
from tritonforge.engine.core_client import CorePaths, EngineCoreClient, core_key


class Collector:
    """One request's callback: every output, then done."""

    def __init__(self) -> None:
        self.outputs: list = []
        self.error: BaseException | None = None
        self.done = threading.Event()

    def __call__(self, output, error) -> None:
        if error is not None:
            self.error = error
            self.done.set()
            return
        self.outputs.append(output)
        if output.finished:
            self.done.set()

    def wait(self, timeout: float = 60.0):
        assert self.done.wait(timeout), "the request never finished"
        return self


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child (ours, not yet reaped) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def assert_turns_dead(client: EngineCoreClient, prompt_ids: list[int], within: float) -> None:
    """The front end reports its core dead within `within` seconds and fails a new request
    at once with EngineDeadError."""
    deadline = time.monotonic() + within
    while client.healthy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not client.healthy
    late = Collector()
    client.add_request("late", prompt_ids, SamplingParams(max_tokens=2), callback=late)
    assert isinstance(late.wait(1).error, EngineDeadError)


@pytest.fixture(scope="module")
def config(tiny_model) -> EngineConfig:
    return EngineConfig(model=str(tiny_model("LlamaForCausalLM")), device="cpu",
                        max_model_len=256, num_kv_blocks=64, max_num_batched_tokens=128)


@pytest.fixture
def client(config, tmp_path):
    c = EngineCoreClient(config, runtime_dir=tmp_path / "rt", owner_pid=os.getpid(),
                         name="test", idle_timeout=0.5)
    yield c
    c.shutdown()
    _wait_gone(c.info.pid, 15)


PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
    SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=24, ignore_eos=True),
    SamplingParams(temperature=1.0, top_k=20, seed=3, max_tokens=30, stop=["e", "the"]),
    SamplingParams(temperature=0.0, max_tokens=16, logprobs=3, ignore_eos=True),
    SamplingParams(temperature=0.7, seed=11, max_tokens=20, min_tokens=5,
                   repetition_penalty=1.2),
]


def test_streamed_outputs_through_the_core_equal_the_in_process_engine(client, config):
    prompts = ["Once upon a time", "The quick brown fox", "A language model reads",
               "def generate(prompt", "Listen, he said"]
    tok = client.tokenizer
    ids = [tok(p)["input_ids"] for p in prompts]
    collectors = []
    for i, (prompt_ids, params) in enumerate(zip(ids, PARAMS)):
        c = Collector()
        client.add_request(str(i), prompt_ids, params, callback=c)
        collectors.append(c)
    reference = LLMEngine(config.for_runner("generate"))
    expected = {}
    for i, (prompt_ids, params) in enumerate(zip(ids, PARAMS)):
        reference.add_request(str(i), prompt_ids, params)
    while reference.has_unfinished_requests():
        for out in reference.step():
            if out.finished:
                expected[out.request_id] = out.outputs[0]
    for i, c in enumerate(collectors):
        c.wait()
        assert c.error is None
        final = c.outputs[-1].outputs[0]
        ref = expected[str(i)]
        assert final.token_ids == ref.token_ids, f"request {i}"
        assert final.text == ref.text, f"request {i}"
        assert (final.finish_reason, final.stop_reason) == (ref.finish_reason, ref.stop_reason)
        assert "".join(o.outputs[0].text_delta for o in c.outputs) == ref.text
        assert sum((o.outputs[0].token_ids_delta for o in c.outputs), []) == ref.token_ids
        if PARAMS[i].logprobs is not None:
            assert final.logprobs == ref.logprobs  # same process, same CPU kernels
            assert final.cumulative_logprob == pytest.approx(ref.cumulative_logprob)


def test_a_stop_string_ends_the_stream_here_and_aborts_the_request_in_the_core(client):
    ids = client.tokenizer("The quick brown fox")["input_ids"]
    c = Collector()
    client.add_request("s", ids, SamplingParams(temperature=1.0, seed=5, max_tokens=200,
                                                stop=["e"]), callback=c)
    final = c.wait().outputs[-1].outputs[0]
    assert final.finish_reason == "stop" and final.stop_reason == "e"
    assert "e" not in final.text
    deadline = time.monotonic() + 5
    while client.stats().num_running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.stats().num_running == 0 and client.stats().kv_cache_usage == 0


def test_front_ends_share_one_core_and_a_leaving_front_end_frees_its_blocks(client, config,
                                                                           tmp_path):
    other = EngineCoreClient(config, runtime_dir=tmp_path / "rt", owner_pid=os.getpid(),
                             name="other")
    assert other.info.pid == client.info.pid
    ids = client.tokenizer("a long running request")["input_ids"]
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    left = [Collector() for _ in range(3)]
    for i, c in enumerate(left):
        other.add_request(str(i), ids, long, callback=c)
    mine = Collector()
    client.add_request("mine", ids, SamplingParams(temperature=0.0, max_tokens=8,
                                                   ignore_eos=True), callback=mine)
    deadline = time.monotonic() + 30
    while other.stats().num_running < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    other.shutdown()  # detaches with three requests in flight
    for c in left:
        assert c.done.wait(10) and isinstance(c.error, EngineDeadError)
    assert mine.wait().error is None and len(mine.outputs[-1].outputs[0].token_ids) == 8
    # A step of this front end's reports the whole core's usage: the leaver's blocks are free.
    probe = Collector()
    client.add_request("probe", ids, SamplingParams(max_tokens=2, ignore_eos=True),
                       callback=probe)
    probe.wait()
    assert client.core_kv_cache_usage == 0


def test_a_bad_request_fails_alone(client):
    ids = client.tokenizer("fine")["input_ids"]
    bad, good = Collector(), Collector()
    client.add_request("bad", list(range(1, 300)), SamplingParams(max_tokens=4), callback=bad)
    client.add_request("good", ids, SamplingParams(max_tokens=4, ignore_eos=True), callback=good)
    assert isinstance(bad.wait().error, ValueError) and "max_model_len" in str(bad.error)
    assert good.wait().error is None and good.outputs[-1].finished


def test_aborting_ends_the_request_with_abort_and_frees_its_blocks(client):
    ids = client.tokenizer("abort me")["input_ids"]
    c = Collector()
    client.add_request("x", ids, SamplingParams(max_tokens=200, ignore_eos=True), callback=c)
    while not c.outputs:
        time.sleep(0.01)
    client.abort("x")
    assert c.wait().outputs[-1].outputs[0].finish_reason == "abort"
    deadline = time.monotonic() + 0.5
    while client.stats().kv_cache_usage > 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.stats().kv_cache_usage == 0


def test_a_killed_core_fails_every_request_in_flight_at_once(config, tmp_path):
    client = EngineCoreClient(config, runtime_dir=tmp_path / "rt", owner_pid=os.getpid())
    ids = client.tokenizer("doomed")["input_ids"]
    collectors = [Collector() for _ in range(4)]
    for i, c in enumerate(collectors):
        client.add_request(str(i), ids, SamplingParams(max_tokens=200, ignore_eos=True),
                           callback=c)
    os.kill(client.info.pid, signal.SIGKILL)
    start = time.monotonic()
    for c in collectors:
        assert c.done.wait(5) and isinstance(c.error, EngineDeadError)
    assert time.monotonic() - start < 5 and not client.healthy
    late = Collector()
    client.add_request("late", ids, SamplingParams(max_tokens=2), callback=late)
    assert isinstance(late.wait(1).error, EngineDeadError)
    client.shutdown()


def test_a_core_that_cannot_load_its_model_says_why(tmp_path):
    bad = EngineConfig(model=str(tmp_path), device="cpu")  # an empty folder
    with pytest.raises(RuntimeError, match="engine core failed to start"):
        EngineCoreClient(bad, runtime_dir=tmp_path / "rt", owner_pid=os.getpid())


def test_no_core_outlives_its_owner_or_its_last_front_end(config, tmp_path):
    # Owner: a short-lived process; the core must notice it is gone.
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    client = EngineCoreClient(config, runtime_dir=tmp_path / "rt", owner_pid=owner.pid,
                              idle_timeout=60)
    core_pid = client.info.pid
    owner.kill()
    owner.wait()
    assert _wait_gone(core_pid, 10), "the core outlived the process it serves"
    client.shutdown()
    # Last front end detaching: the core exits after its idle timeout.
    client = EngineCoreClient(config, runtime_dir=tmp_path / "rt2", owner_pid=os.getpid(),
                              idle_timeout=0.5)
    core_pid = client.info.pid
    client.shutdown()
    assert _wait_gone(core_pid, 10), "the core outlived its last front end"
    assert not (tmp_path / "rt2" / f"{client.paths.key}.sock").exists()


def test_a_core_whose_steps_keep_failing_fails_its_requests_then_declares_itself_dead(
        config, tmp_path):
    """The core's own loop (run in this process, over its real socket) with a model whose
    forward raises: each failing step fails its requests alone; after three in a row the
    core tells its front ends it is dead and exits its loop."""
    from multiprocessing.connection import Listener

    engine = LLMEngine(config.for_runner("generate"))

    def fault(module, inputs):
        raise RuntimeError("injected fault in the model's forward")

    engine.model.register_forward_pre_hook(fault)
    paths = CorePaths(tmp_path / "rt", core_key(config.resolved(), os.getpid()))
    paths.runtime_dir.mkdir()
    paths.path("key").write_bytes(b"k" * 32)
    listener = Listener(str(paths.path("sock")), family="AF_UNIX", authkey=b"k" * 32)
    core = EngineCore(engine, listener, watch_pid=None, idle_timeout=60)
    result: list[int] = []
    loop = threading.Thread(target=lambda: result.append(core.serve()), daemon=True)
    loop.start()
    client = EngineCoreClient(config, runtime_dir=paths.runtime_dir, owner_pid=os.getpid())
    ids = client.tokenizer("fails")["input_ids"]
    for i in range(3):
        c = Collector()
        client.add_request(str(i), ids, SamplingParams(max_tokens=4), callback=c)
        assert "injected fault" in str(c.wait().error)
    loop.join(10)
    assert result == [1], "the core did not give up after three failed steps"
    assert_turns_dead(client, ids, within=5)
    client.shutdown()
    listener.close()
