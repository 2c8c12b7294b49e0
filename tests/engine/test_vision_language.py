"""Vision-language generation must produce what transformers' generate produces on the same
images and prompt: tiny random Qwen2-VL, Qwen2.5-VL, Gemma 3, LLaVA and Mistral 3 (fp32,
CPU), one image and two, alone, batched with text-only requests and in small prefill
chunks. Images key the prefix cache by content; bad images fail alone, naming the field."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
import torch
import transformers
from tritonforge.engine import LLM, SamplingParams

from tests.fixtures.tiny_vlm import TINY_VLM_ARCHITECTURES, make_tiny_vlm, random_image

MAX_TOKENS = 10
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", params=TINY_VLM_ARCHITECTURES)
def vlm(request, tmp_path_factory):
    path = make_tiny_vlm(request.param, tmp_path_factory.mktemp(request.param))
    processor = transformers.AutoProcessor.from_pretrained(path)
    hf = transformers.AutoModelForImageTextToText.from_pretrained(path).eval()
    return request.param, path, processor, hf


def _chat_text(processor, num_images: int, text: str) -> str:
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True, tokenize=False)


def _hf_greedy(hf, processor, text: str, images: list) -> list[int]:
    inputs = processor(text=[text], images=images or None, return_tensors="pt")
    out = hf.generate(**inputs, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                      do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def _cases(processor):
    one = _chat_text(processor, 1, "The quick brown fox")
    two = _chat_text(processor, 2, "Once upon a time")
    return [(one, [random_image(1)]),
            (two, [random_image(2, (56, 28)), random_image(3, (28, 42))]),
            (_chat_text(processor, 1, "A language model reads"), [random_image(4, (64, 64))])]


def test_image_prompts_alone_and_batched_with_text_equal_transformers(vlm) -> None:
    _, path, processor, hf = vlm
    cases = _cases(processor)
    want = [_hf_greedy(hf, processor, text, images) for text, images in cases]
    text_only = "The children laughed, asked questions"
    want_text = _hf_greedy(hf, processor, text_only, [])
    llm = LLM(path, dtype="float32", device="cpu", max_model_len=256)
    for (text, images), expected in zip(cases, want):  # alone
        out = llm.generate({"prompt": text, "multi_modal_data": {"image": images}}, GREEDY)
        assert list(out[0].outputs[0].token_ids) == expected
    batch = [{"prompt": text, "multi_modal_data": {"image": images}} for text, images in cases]
    outs = llm.generate([text_only, *batch, text_only], GREEDY)
    got = [list(o.outputs[0].token_ids) for o in outs]
    assert got == [want_text, *want, want_text]
    assert llm.engine.block_manager.num_used_blocks == 0


def test_small_prefill_chunks_split_images_and_still_equal_transformers(vlm) -> None:
    # 16-token chunks: every image's rows are spread over several steps (Gemma 3's are
    # never split: a chunk ends before its image or takes it whole).
    _, path, processor, hf = vlm
    cases = _cases(processor)
    want = [_hf_greedy(hf, processor, text, images) for text, images in cases]
    llm = LLM(path, dtype="float32", device="cpu", max_model_len=256,
              max_num_batched_tokens=16, enable_prefix_caching=False)
    outs = llm.generate([{"prompt": t, "multi_modal_data": {"image": i}} for t, i in cases],
                        GREEDY)
    assert [list(o.outputs[0].token_ids) for o in outs] == want


def test_prefix_cache_is_keyed_by_image_content(vlm) -> None:
    _, path, processor, hf = vlm
    text = _chat_text(processor, 1, "The quick brown fox jumps over the lazy dog again")
    llm = LLM(path, dtype="float32", device="cpu", max_model_len=256)
    bm = llm.engine.block_manager
    first, other = random_image(7), random_image(8)
    llm.generate({"prompt": text, "multi_modal_data": {"image": first}}, GREEDY)
    hits = bm.prefix_cache_hits
    out = llm.generate({"prompt": text, "multi_modal_data": {"image": other}}, GREEDY)
    # Only blocks before the first image token may hit; every block from there differs.
    ids = out[0].prompt_token_ids
    image_token = llm.engine.model.image_token_id
    first_image_block = ids.index(image_token) // bm.block_size
    assert bm.prefix_cache_hits - hits <= first_image_block * bm.block_size
    assert list(out[0].outputs[0].token_ids) == _hf_greedy(hf, processor, text, [other])
    hits = bm.prefix_cache_hits
    again = llm.generate({"prompt": text, "multi_modal_data": {"image": other}}, GREEDY)
    assert bm.prefix_cache_hits - hits >= (len(ids) - 1) // bm.block_size * bm.block_size
    assert list(again[0].outputs[0].token_ids) == list(out[0].outputs[0].token_ids)


def test_chat_with_data_url_image_parts_equals_the_prompt_form(vlm) -> None:
    _, path, processor, _ = vlm
    image = random_image(5)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    llm = LLM(path, dtype="float32", device="cpu", max_model_len=256)
    chat = llm.chat([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "The quick brown fox"}]}], GREEDY)
    plain = llm.generate({"prompt": _chat_text(processor, 1, "The quick brown fox"),
                          "multi_modal_data": {"image": image}}, GREEDY)
    assert list(chat[0].outputs[0].token_ids) == list(plain[0].outputs[0].token_ids)


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> Path:
    return make_tiny_vlm("LlavaForConditionalGeneration", tmp_path_factory.mktemp("llava"))


@pytest.mark.parametrize("image, message", [
    (b"not an image", r"multi_modal_data\.image\[0\]: not a decodable image \(PNG"),
    ("https://example.com/cat.png", "only data: URLs are accepted"),
    ("data:image/png,rawtext", "must be base64"),
    ("%%%", "not base64 image data"),
    (12, "must be encoded bytes, base64 text or a data: URL"),
])
def test_a_bad_image_fails_alone_naming_the_field(llava, image, message) -> None:
    llm = LLM(llava, dtype="float32", device="cpu", max_model_len=256)
    processor = llm.image_processor().processor
    text = _chat_text(processor, 1, "The quick brown fox")
    with pytest.raises(ValueError, match=message):
        llm.generate({"prompt": text, "multi_modal_data": {"image": image}}, GREEDY)
    assert llm.engine.block_manager.num_used_blocks == 0
    out = llm.generate({"prompt": text, "multi_modal_data": {"image": random_image(1)}}, GREEDY)
    assert len(out[0].outputs[0].token_ids) == MAX_TOKENS


def test_image_count_limits_and_placeholder_mismatches_are_refused(llava) -> None:
    from tritonforge.engine import multimodal

    llm = LLM(llava, dtype="float32", device="cpu", max_model_len=256)
    processor = llm.image_processor().processor
    one = _chat_text(processor, 1, "fox")
    with pytest.raises(ValueError, match=r"2 image\(s\) but the prompt holds 1 image placeholder"):
        llm.generate({"prompt": one, "multi_modal_data": {"image": [random_image(1)] * 2}})
    many = [random_image(1)] * (multimodal.MAX_IMAGES_PER_REQUEST + 1)
    with pytest.raises(ValueError, match=f"at most {multimodal.MAX_IMAGES_PER_REQUEST} per"):
        llm.generate({"prompt": one, "multi_modal_data": {"image": many}})
    with pytest.raises(ValueError, match="multi_modal_data takes 'image' only"):
        llm.generate({"prompt": one, "multi_modal_data": {"video": []}})
    huge = random_image(1, (4097, 4097))
    with pytest.raises(ValueError, match="more than 16777216 pixels"):
        llm.generate({"prompt": one, "multi_modal_data": {"image": huge}})
    # Token ids that claim more placeholders than the images give rows for.
    ids, data = llm.image_processor().process(one, [random_image(1)])
    image_token = llm.engine.model.image_token_id
    with pytest.raises(ValueError, match="give 4 embedding rows but the prompt holds 5"):
        llm.engine.add_request(None, [image_token] + ids, GREEDY, multi_modal_data=data)
    assert not llm.engine.scheduler.has_unfinished


def test_images_sent_to_a_text_only_model_are_refused(tiny_model) -> None:
    from tritonforge.engine.multimodal import MultiModalData

    llm = LLM(tiny_model("LlamaForCausalLM"), dtype="float32", device="cpu")
    data = MultiModalData({"pixel_values": torch.zeros(1, 3, 28, 28)}, 1, 1)
    with pytest.raises(ValueError, match="is not a vision-language model"):
        llm.engine.add_request(None, [1, 2, 3], GREEDY, multi_modal_data=data)


def test_gemma3_images_attend_both_ways_as_transformers_does(tmp_path) -> None:
    """Without the bidirectional image attention, Gemma 3's greedy tokens differ from HF's
    (so the equality above really checks it): HF without token_type_ids is causal."""
    path = make_tiny_vlm("Gemma3ForConditionalGeneration", tmp_path / "g3")
    processor = transformers.AutoProcessor.from_pretrained(path)
    hf = transformers.AutoModelForImageTextToText.from_pretrained(path).eval()
    text = _chat_text(processor, 1, "The quick brown fox")
    inputs = processor(text=[text], images=[random_image(1)], return_tensors="pt")
    with torch.no_grad():
        both_ways = hf(**inputs).logits[0, -1]
        causal = hf(**{k: v for k, v in inputs.items() if k != "token_type_ids"}).logits[0, -1]
    assert not torch.allclose(both_ways, causal, atol=1e-4)
    llm = LLM(path, dtype="float32", device="cpu", max_model_len=256)
    captured = {}
    llm.apply_model(lambda m: m.register_forward_hook(
        lambda mod, args, out: captured.setdefault("hidden", out)))
    llm.generate({"prompt": text, "multi_modal_data": {"image": random_image(1)}},
                 SamplingParams(max_tokens=1, temperature=0.0))
    with torch.inference_mode():
        ours = llm.apply_model(lambda m: m.compute_logits(captured["hidden"][-1:]))[0]
    torch.testing.assert_close(ours, both_ways, atol=1e-4, rtol=0)


def test_images_are_encoded_once_per_request(llava, monkeypatch) -> None:
    # The door encodes to check the row count; the prefill reuses those rows (a second
    # encode would double the vision tower's cost), in one chunk or in several.
    llm = LLM(llava, dtype="float32", device="cpu", max_model_len=256,
              max_num_batched_tokens=16)
    model = llm.engine.model
    calls = []
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    text = _chat_text(llm.image_processor().processor, 1, "The quick brown fox")
    prompts = [{"prompt": text, "multi_modal_data": {"image": random_image(i)}}
               for i in range(3)]
    llm.generate(prompts, GREEDY)
    assert len(calls) == 3
    assert all(seq.mm is None or seq.mm.embeds is None for seq in llm.engine.scheduler.running)
