"""SmolLM2-135M-Instruct (real weights, Q4_1 GGUF dequantized) generates exactly what
transformers generates from the same file, greedy, fp32 on CPU."""

from __future__ import annotations

import pytest
import torch
from tritonforge.engine import LLM, SamplingParams
from tritonforge.generator.examples import EXAMPLES, fetch_example

pytestmark = pytest.mark.slow

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about GPUs."}],
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": "Colour of the sky?"}],
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    return fetch_example("chat", cache_dir=tmp_path_factory.mktemp("examples"), progress=False)


def test_smollm2_gguf_greedy_equals_transformers(smollm2):
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF
    import transformers

    gguf = EXAMPLES["chat"].gguf_file
    llm = LLM(model=smollm2, device="cpu", dtype="float32", max_model_len=1024)
    outs = llm.chat(PROMPTS, SamplingParams(temperature=0.0, max_tokens=32))
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2, gguf_file=gguf,
                                                           dtype=torch.float32).eval()
    eos = llm.engine.eos_token_ids
    for out in outs:
        ids = torch.tensor([out.prompt_token_ids])
        with torch.inference_mode():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                              do_sample=False)[0, ids.shape[1]:].tolist()
        for i, t in enumerate(ref):
            if t in eos:
                ref = ref[: i + 1]
                break
        assert out.outputs[0].token_ids == ref
    assert "Paris" in outs[0].outputs[0].text
