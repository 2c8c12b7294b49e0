"""Vision-language generation: images/s and output tok/s of our engine and of transformers'
generate, in one process, on the same requests.

    python -m benchmarks vision --model qwen2.5-vl-7b --concurrency 64

A random-weight model of a published config (bf16; the vision tower, projector and language
model all random), C requests of one distinct image each (random pixels, `--image-size`
square: 448 -> 1,024 patches -> 256 image tokens for Qwen2.5-VL) plus `--prompt-len` text
ids, `--output-len` tokens out (ignore_eos, greedy). The requests go to the engine as token
ids with the processor's tensors (pixel_values, image_grid_thw), as the Triton tokenizer
step hands them over, so the timing is the engine's (vision tower, prefill, decode), not the
image decoding. transformers runs `generate` on batches of `--hf-batch` of the same requests.
images/s = C / wall time; output tok/s = generated tokens / wall time.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    INIT_STD,
    add_device_arguments,
    build_tokenizer,
    environment,
    log,
    resolve_device,
    write_result,
)

_QWEN_SPECIALS = {"vision_start_token_id": 151652, "vision_end_token_id": 151653,
                  "image_token_id": 151655, "video_token_id": 151656}
VISION_CONFIGS: dict[str, dict[str, Any]] = {
    # Qwen/Qwen2.5-VL-7B-Instruct's published config.json (text and vision shapes).
    "qwen2.5-vl-7b": {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        **_QWEN_SPECIALS,
        "text_config": {
            "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
            "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
            "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                "mrope_section": [16, 24, 24]}},
        "vision_config": {
            "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
            "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
            "temporal_patch_size": 2, "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2},
    },
    # CI only: the same code paths on CPU in seconds.
    "tiny-vl": {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        **{k: v - 150000 for k, v in _QWEN_SPECIALS.items()},
        "text_config": {
            "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 2064,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                "mrope_section": [2, 3, 3]}},
        "vision_config": {
            "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
            "out_hidden_size": 64, "patch_size": 14, "spatial_merge_size": 2,
            "temporal_patch_size": 2, "window_size": 56, "fullatt_block_indexes": [1]},
    },
}


def random_vision_model(name: str, out_dir: Path, device: str) -> Path:
    """`out_dir/<name>`: config, random bf16 weights, a tokenizer covering the vocabulary."""
    import transformers

    folder = out_dir / name
    wanted = json.dumps(VISION_CONFIGS[name], sort_keys=True)
    marker = folder / ".complete"
    if marker.is_file() and marker.read_text() == wanted:
        return folder
    fields = json.loads(wanted)
    config = transformers.CONFIG_MAPPING[fields.pop("model_type")](**fields)
    vocab = config.text_config.vocab_size
    config.text_config.update({"bos_token_id": vocab - 3, "pad_token_id": vocab - 3,
                               "eos_token_id": vocab - 1})
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForImageTextToText.from_config(config,
                                                                     dtype=torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, INIT_STD)
    model.save_pretrained(folder)
    del model
    build_tokenizer(vocab).save_pretrained(folder)
    marker.write_text(wanted)
    return folder


def requests(config: Any, count: int, prompt_len: int, image_size: int, seed: int = 0
             ) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
    """(prompt ids, processor tensors) per request: text, one image's placeholders, text."""
    vision = config.vision_config
    patch, merge, temporal = vision.patch_size, vision.spatial_merge_size, \
        vision.temporal_patch_size
    side = image_size // patch
    num_tokens = side * side // merge**2
    gen = torch.Generator().manual_seed(seed)
    top = min(10000, config.text_config.vocab_size - 10)
    out = []
    for _ in range(count):
        text = torch.randint(0, top, (prompt_len,), generator=gen).tolist()
        half = prompt_len // 2
        ids = (text[:half] + [config.vision_start_token_id]
               + [config.image_token_id] * num_tokens + [config.vision_end_token_id]
               + text[half:])
        pixels = torch.randn(side * side, 3 * temporal * patch * patch, generator=gen)
        out.append((ids, {"pixel_values": pixels,
                          "image_grid_thw": torch.tensor([[1, side, side]])}))
    return out


def run_ours(model_dir: Path, batch: list[tuple[list[int], dict[str, torch.Tensor]]],
             args: argparse.Namespace, device: str, dtype: str) -> dict[str, Any]:
    from tritonforge.engine import LLM, SamplingParams
    from tritonforge.engine.multimodal import MultiModalData, content_hash

    llm = LLM(model=str(model_dir), device=device, dtype=dtype,
              max_model_len=args.max_model_len, max_num_seqs=max(len(batch), 8),
              gpu_memory_utilization=0.85, enable_prefix_caching=False)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)

    def one_run(items: list[tuple[list[int], dict[str, torch.Tensor]]]) -> tuple[float, int]:
        for ids, tensors in items:
            engine.add_request(None, ids, params, stream=False, multi_modal_data=MultiModalData(
                tensors, content_hash(tensors), 1))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started, tokens, done = time.perf_counter(), 0, 0
        while done < len(items):
            for out in engine.step():
                if out.finished:
                    done += 1
                    tokens += len(out.outputs[0].token_ids)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - started, tokens

    one_run(batch[:4])  # warm-up: kernels compiled, graphs captured
    seconds, tokens = one_run(batch)
    return {"seconds": seconds, "images_s": len(batch) / seconds, "tok_s": tokens / seconds,
            "output_tokens": tokens}


def run_transformers(model_dir: Path, batch: list[tuple[list[int], dict[str, torch.Tensor]]],
                     args: argparse.Namespace, device: str, dtype: str) -> dict[str, Any]:
    import transformers

    model = transformers.AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), attn_implementation="sdpa").to(device).eval()
    image_token = model.config.image_token_id

    def generate(items: list[tuple[list[int], dict[str, torch.Tensor]]]) -> int:
        ids = torch.tensor([i for i, _ in items], device=device)  # equal lengths: no padding
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids),
                mm_token_type_ids=(ids == image_token).long(),
                pixel_values=torch.cat([t["pixel_values"] for _, t in items]).to(device),
                image_grid_thw=torch.cat([t["image_grid_thw"] for _, t in items]).to(device),
                max_new_tokens=args.output_len, min_new_tokens=args.output_len,
                do_sample=False)
        return (out.shape[1] - ids.shape[1]) * len(items)

    generate(batch[:2])  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started, tokens = time.perf_counter(), 0
    for start in range(0, len(batch), args.hf_batch):
        tokens += generate(batch[start:start + args.hf_batch])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "images_s": len(batch) / seconds, "tok_s": tokens / seconds,
            "output_tokens": tokens, "batch": args.hf_batch}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    device, dtype = resolve_device(args.device, args.dtype)
    model_dir = random_vision_model(args.model, args.model_cache, device)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    batch = requests(config, args.concurrency, args.prompt_len, args.image_size)
    results: dict[str, Any] = {"image_tokens": batch[0][0].count(config.image_token_id),
                               "prompt_tokens": len(batch[0][0])}
    results["ours"] = run_ours(model_dir, batch, args, device, dtype)
    log("vision", f"ours: {results['ours']['images_s']:.1f} images/s, "
                  f"{results['ours']['tok_s']:.0f} tok/s")
    gc.collect()  # our engine's KV cache goes before transformers loads its copy
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    if not args.skip_transformers:
        results["transformers"] = run_transformers(model_dir, batch, args, device, dtype)
        log("vision", f"transformers: {results['transformers']['images_s']:.1f} images/s, "
                      f"{results['transformers']['tok_s']:.0f} tok/s")
        results["speedup_tok_s"] = results["ours"]["tok_s"] / results["transformers"]["tok_s"]
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks vision", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arguments(p)
    p.add_argument("--model", default="qwen2.5-vl-7b", choices=sorted(VISION_CONFIGS))
    p.add_argument("--model-cache", type=Path, default=Path(tempfile.gettempdir()) / "tf-bench")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--hf-batch", type=int, default=16)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--out", type=Path, default=Path("results/vision.json"))
    args = p.parse_args(argv)
    results = run(args)
    write_result(args.out, "vision", {k: str(v) for k, v in vars(args).items()}, results,
                 environment())
    print(json.dumps(results, indent=1))
    return results
