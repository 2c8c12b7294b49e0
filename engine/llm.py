"""The offline API, as users know it from vLLM:

    llm = LLM(model="path/or/id", runner="generate")
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    outs[0].outputs[0].text
    LLM(model="all-MiniLM-L6-v2", runner="pooling").embed(["a sentence"])[0].outputs.embedding

`runner="auto"` decides by the architecture (causal-LM heads generate, the rest pool).
Generation runs the paged-KV continuous-batching engine to completion for a batch of
prompts; pooling runs the pooling runner. Either way a failure partway (a bad prompt among
many) aborts what was queued, so nothing leaks.

A model that is not a local path is downloaded once, here, from the Hugging Face Hub (or
ModelScope: hub="modelscope", or TRITONFORGE_USE_MODELSCOPE=1 when hub is not given; this
module is the edge that reads the environment, see hub_from_environment).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tritonforge.engine.config import EngineConfig
from tritonforge.engine.llm_engine import LLMEngine
from tritonforge.engine.multimodal import ImageProcessor, MultiModalData, chat_images
from tritonforge.engine.outputs import (
    ClassificationRequestOutput,
    EmbeddingRequestOutput,
    PoolingRequestOutput,
    RequestOutput,
    ScoringRequestOutput,
)
from tritonforge.engine.pooling_params import PoolingParams
from tritonforge.engine.pooling_runner import PoolingRunner
from tritonforge.engine.sampling_params import SamplingParams
from tritonforge.models.weight_utils import load_config

_GENERATE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")

# Text, token ids, or (vision-language models) {"prompt": text, "multi_modal_data":
# {"image": an image or a list of them}}: PIL images, encoded bytes, base64 or data: URLs.
Prompt = str | list[int] | dict[str, Any]


def hub_from_environment() -> str:
    """The hub for model ids when LLM(hub=...) is not given: "modelscope" when
    TRITONFORGE_USE_MODELSCOPE is 1/true/yes, else "hf". The only environment read."""
    flag = os.environ.get("TRITONFORGE_USE_MODELSCOPE", "").strip().lower()
    return "modelscope" if flag in ("1", "true", "yes") else "hf"


def resolve_runner(config: EngineConfig) -> str:
    """"auto" -> generate for causal-LM heads, pooling for the rest. Any model can pool (a
    decoder pools its last token); only a causal-LM head can generate."""
    if config.runner == "pooling":
        return "pooling"
    hf_config = load_config(config.model, trust_remote_code=config.trust_remote_code)
    architectures = getattr(hf_config, "architectures", None) or []
    generates = any(a.endswith(_GENERATE_SUFFIXES) for a in architectures)
    if config.runner == "generate" and not generates:
        raise ValueError(
            f"runner='generate' needs a causal-LM architecture, but this model is "
            f"{', '.join(architectures) or 'unknown'}; use runner='pooling' (or 'auto')"
        )
    return "generate" if generates else "pooling"


class LLM:
    """Load a model once; generate from it or pool with it."""

    def __init__(self, model: str | Path, runner: str = "auto", model_impl: str = "auto",
                 dtype: str = "auto", max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.9, block_size: int = 16,
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 device: str = "auto", seed: int = 0, trust_remote_code: bool = False,
                 hub: str | None = None, **engine_kwargs: Any) -> None:
        config = EngineConfig(
            model=model, runner=runner, model_impl=model_impl, dtype=dtype,
            max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
            block_size=block_size, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, device=device, seed=seed,
            trust_remote_code=trust_remote_code,
            hub=hub if hub is not None else hub_from_environment(), **engine_kwargs,
        ).resolved()  # hub ids -> local snapshot folders, once, before anything loads
        self.config = config.for_runner(resolve_runner(config))
        self.engine: LLMEngine | None = None
        self.pooler: PoolingRunner | None = None
        self._image_processor: ImageProcessor | None = None  # made by the first image prompt
        if self.config.runner == "generate":
            self.engine = LLMEngine(self.config)
        else:
            self.pooler = PoolingRunner(self.config)

    # ---- shared --------------------------------------------------------------------------
    @property
    def runner(self) -> str:
        return self.config.runner

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer if self.engine else self.pooler.tokenizer

    @property
    def tokenizer(self) -> Any:
        return self.get_tokenizer()

    def apply_model(self, fn: Callable[[nn.Module], Any]) -> Any:
        """Call `fn` on the loaded nn.Module (inspection, hooks) and return its result."""
        return fn(self.engine.model if self.engine else self.pooler.model)

    def shutdown(self) -> None:
        """Stops the worker ranks of a tensor-parallel group (also done when this LLM is
        garbage collected or the interpreter exits)."""
        (self.engine or self.pooler).shutdown()

    def _need(self, runner: str, method: str) -> Any:
        target = self.engine if runner == "generate" else self.pooler
        if target is None:
            raise ValueError(f"{method}() needs runner={runner!r}; this LLM was built with "
                             f"runner={self.runner!r}")
        return target

    # ---- generation ----------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Runs every prompt to completion; one RequestOutput per prompt, in input order."""
        engine: LLMEngine = self._need("generate", "generate")
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                        and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = [prompts] if isinstance(prompts, dict) else list(prompts)
        texts = [p.get("prompt") if isinstance(p, dict) else None for p in prompts]
        return self._run(engine, prompts, sampling_params, texts, use_tqdm)

    def image_processor(self) -> ImageProcessor:
        """The model's HF processor (made once, on the first request with images)."""
        if self._image_processor is None:
            self._image_processor = ImageProcessor(self.config.model,
                                                   self.config.trust_remote_code)
        return self._image_processor

    def _with_images(self, prompt: dict[str, Any]) -> tuple[Any, MultiModalData | None]:
        """A {"prompt", "multi_modal_data"} prompt -> (prompt ids, its MultiModalData)."""
        unknown = set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data"}
        if unknown:
            raise ValueError(f"unknown prompt field(s) {sorted(unknown)}; a prompt dict takes "
                             "prompt, prompt_token_ids and multi_modal_data")
        data = prompt.get("multi_modal_data") or {}
        if set(data) - {"image"}:
            raise ValueError(f"multi_modal_data takes 'image' only; got {sorted(data)}")
        images = data.get("image", [])
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if "prompt" not in prompt:
            if images:
                raise ValueError("a prompt with images needs 'prompt' text with the image "
                                 "placeholders (token ids cannot show where images go)")
            return list(prompt.get("prompt_token_ids") or []), None
        if not images:
            return prompt["prompt"], None
        return self.image_processor().process(prompt["prompt"], images,
                                              field="multi_modal_data.image")
    def chat(
        self,
        messages: list[dict[str, Any]] | Sequence[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Renders each conversation with the tokenizer's chat template, then generates."""
        engine: LLMEngine = self._need("generate", "chat")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts: list[Prompt] = []
        texts: list[str | None] = []
        for conv in conversations:
            conv, images = chat_images(conv)  # OpenAI image_url parts -> {"type": "image"}
            template_owner = engine.tokenizer
            if images and chat_template is None and not getattr(
                    engine.tokenizer, "chat_template", None):
                template_owner = self.image_processor().processor  # a VLM's processor's
            text = render_chat(template_owner, conv, chat_template, add_generation_prompt,
                               chat_template_kwargs)
            texts.append(text)
            if images:
                prompts.append({"prompt": text, "multi_modal_data": {"image": images}})
            else:  # the template already holds the special tokens (BOS, turn markers)
                prompts.append(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._run(engine, prompts, sampling_params, texts, use_tqdm)

    def _run(self, engine: LLMEngine, prompts: list[Prompt], sampling_params: Any,
             texts: list[str | None], use_tqdm: bool) -> list[RequestOutput]:
        params = _per_prompt(sampling_params, len(prompts), SamplingParams, "sampling_params")
        ids: list[str] = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                try:
                    images = None
                    if isinstance(prompt, dict):
                        prompt, images = self._with_images(prompt)
                    ids.append(engine.add_request(None, prompt, p, stream=False,
                                                  multi_modal_data=images))
                except ValueError as err:
                    raise ValueError(f"prompts[{i}]: {err}") from None
            finals: dict[str, RequestOutput] = {}
            progress = _progress(use_tqdm, len(ids))
            while len(finals) < len(ids):
                for out in engine.step():
                    if out.finished:
                        finals[out.request_id] = out
                        if progress is not None:
                            progress.update(1)
            if progress is not None:
                progress.close()
        except BaseException:
            for request_id in ids:
                engine.abort_request(request_id)
            raise
        outputs = [finals[i] for i in ids]
        for out, text in zip(outputs, texts):
            if text is not None:
                out.prompt = text
        return outputs

    # ---- pooling -------------------------------------------------------------------------
    def embed(self, texts: str | Sequence[str],
              pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
              use_tqdm: bool = False) -> list[EmbeddingRequestOutput]:
        return self._need("pooling", "embed").embed(texts, pooling_params, use_tqdm)

    encode = embed

    def embed_tensors(self, texts: str | Sequence[str],
                      pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
                      use_tqdm: bool = False) -> torch.Tensor:
        return self._need("pooling", "embed_tensors").embed_tensors(texts, pooling_params,
                                                                    use_tqdm)

    def classify(self, texts: str | Sequence[str],
                 pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
                 use_tqdm: bool = False) -> list[ClassificationRequestOutput]:
        return self._need("pooling", "classify").classify(texts, pooling_params, use_tqdm)

    def classify_tensors(self, texts: str | Sequence[str],
                         pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
                         use_tqdm: bool = False) -> torch.Tensor:
        return self._need("pooling", "classify_tensors").classify_tensors(texts, pooling_params,
                                                                          use_tqdm)

    def reward(self, texts: str | Sequence[str],
               pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
               use_tqdm: bool = False) -> list[PoolingRequestOutput]:
        return self._need("pooling", "reward").reward(texts, pooling_params, use_tqdm)

    def score(self, text_1: str | Sequence[str], text_2: str | Sequence[str],
              truncate_prompt_tokens: int | None = None,
              use_tqdm: bool = False) -> list[ScoringRequestOutput]:
        return self._need("pooling", "score").score(text_1, text_2, truncate_prompt_tokens,
                                                    use_tqdm)

    @property
    def pooling_config(self) -> Any:
        return self._need("pooling", "pooling_config").pooling_config

    @property
    def hidden_size(self) -> int:
        return self._need("pooling", "hidden_size").hidden_size

    @property
    def max_model_len(self) -> int:
        return (self.engine or self.pooler).max_model_len

    @property
    def device(self) -> torch.device:
        return (self.engine or self.pooler).device

    @property
    def dtype(self) -> torch.dtype:
        return (self.engine or self.pooler).dtype


def render_chat(tokenizer: Any, conversation: list[dict[str, Any]], chat_template: str | None,
                add_generation_prompt: bool, kwargs: dict[str, Any] | None) -> str:
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; pass chat_template=")
    return tokenizer.apply_chat_template(
        conversation, chat_template=chat_template, tokenize=False,
        add_generation_prompt=add_generation_prompt, **(kwargs or {}),
    )


def _per_prompt(params: Any, n: int, kind: type, name: str) -> list[Any]:
    if params is None:
        return [kind()] * n
    if isinstance(params, kind):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"{name} has {len(params)} entries for {n} prompts; pass one or one "
                         "per prompt")
    return params


def _progress(enabled: bool, total: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Generating", unit="req")
