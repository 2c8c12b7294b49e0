"""The Transformers modeling backend: any HF decoder-only model, run on our paged KV cache.

Design: the HF model (`AutoModelForCausalLM.from_config`) keeps its own modules and
state-dict names; only its attention is swapped. We register one attention function,
`tritonforge_paged`, in transformers' attention interface (`AttentionInterface.register`,
i.e. `ALL_ATTENTION_FUNCTIONS`) and build the model with `attn_implementation` set to it.
Every HF attention module then hands its projected, position-encoded q/k/v to that
function, which forwards them to our `Attention` layer for the module's `layer_idx`: it
stores this step's K/V at `attn_metadata.slot_mapping` and runs paged attention over the
block tables. So the backend gets paged KV, chunked prefill and continuous batching exactly
like a native model, and the engine cannot tell the two apart.

The engine's step is a flat varlen batch of N tokens; HF sees it as ONE sequence
(`input_ids[None]`, `position_ids=positions[None]`, batch 1, T = N) with `use_cache=False`.
Because the attention name is not in transformers' mask interface, HF builds no mask (no
O(N^2) tensor); sequence boundaries and causality come from the metadata inside our kernel.
The per-step metadata reaches the attention function through a ContextVar set by forward.

Our `Attention` modules live in `self.attn_layers` (one per decoder layer, in layer order),
so `bind_kv_cache` finds them like a native model's. Per call the function takes scaling,
soft-capping and sliding window from HF's arguments (OPT pre-scales q and passes 1.0; Gemma
passes its window per layer), so what HF computes is what we compute.

RMSNorms whose code is exactly LlamaRMSNorm's run as our fused kernel on CUDA
(`FusedRMSNorm`); everything else is HF's own module.

Limits: models that do not route attention through the interface (transformers marks them
`_supports_attention_backend = False`, e.g. Falcon in 5.x) are refused at construction,
naming the architecture; forward also checks every layer really called the paged function.
Models that implement sliding windows only through HF's mask (not the `sliding_window`
argument) or that need a 4D custom mask (prefix-LM, vision tokens) are not served correctly.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any

import torch
import transformers
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from tritonforge.kernels.dispatch import use_triton
from tritonforge.kernels.fused_moe import fused_moe, fused_moe_ref
from tritonforge.kernels.rms_norm import rms_norm
from tritonforge.models.attention_metadata import AttentionMetadata
from tritonforge.models.layers.attention import Attention
from tritonforge.models.layers.parallel_state import current_group, divide, kv_heads_per_rank
from tritonforge.models.transformers_tp import shard_by_tp_plan

ATTN_IMPLEMENTATION = "tritonforge_paged"
# Keywords HF attention modules pass to the attention function that our paged attention
# honours or that do not change the math (flash-attn varlen hints, dropout at eval, flags).
# `s_aux` is gpt-oss's attention sinks, which the kernel applies. Any other (T5's
# `position_bias`, DeepSeek-V3.2's sparse `indices`, Inkling's `sinks`) would be dropped, a
# silent change of the model's output: the model is refused.
HONOURED_KEYWORDS = frozenset({
    "scaling", "dropout", "sliding_window", "softcap", "attention_mask", "query", "key",
    "value", "is_causal", "position_ids", "use_cache", "output_attentions", "cu_seq_lens_q",
    "cu_seq_lens_k", "max_length_q", "max_length_k", "deterministic", "s_aux",
})
# Checkpoint tensors that are not parameters of current HF modules (old buffers).
_SKIP = ("rotary_emb.inv_freq", ".attention.bias", ".attention.masked_bias", ".attn.bias",
         ".attn.masked_bias")


class _Step:
    """What the attention function needs during one forward."""

    __slots__ = ("layers", "metadata", "calls", "spans")

    def __init__(self, layers: nn.ModuleList, metadata: AttentionMetadata) -> None:
        self.layers, self.metadata, self.calls = layers, metadata, 0
        # Vision-language models: image spans that attend both ways (Gemma 3); see
        # transformers_multimodal.bidirectional_fixup
        self.spans: list[tuple[int, int, int, int, int]] = []


_STEP: ContextVar[_Step | None] = ContextVar("tritonforge_paged_step", default=None)


def paged_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature over our paged cache.

    query [1, Hq, N, D], key/value [1, Hkv, N, D] (one flat sequence: the whole step) ->
    (output [1, N, Hq, D], None).
    """
    dropped = sorted(k for k, v in kwargs.items()
                     if k not in HONOURED_KEYWORDS and v is not None and v is not False)
    if dropped or kwargs.get("is_causal") is False:
        raise ValueError(f"{type(module).__name__} passes {', '.join(dropped) or 'is_causal=False'}"
                         f" to the attention function, which {ATTN_IMPLEMENTATION} does not "
                         "apply; serving it would silently change the model's output")
    step = _STEP.get()
    if step is None:
        raise RuntimeError(
            f"{ATTN_IMPLEMENTATION} attention called outside TransformersForCausalLM.forward "
            "(it needs the step's AttentionMetadata)")
    if query.shape[0] != 1:
        raise ValueError(f"{ATTN_IMPLEMENTATION} expects one flat sequence (batch 1), got "
                         f"batch {query.shape[0]}")
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is None:
        raise RuntimeError(f"{type(module).__name__} has no layer_idx; the Transformers backend "
                           "cannot tell which KV cache it owns")
    attn: Attention = step.layers[layer_idx]
    _, num_heads, num_tokens, head_dim = query.shape
    if (num_heads, key.shape[1], head_dim) != (attn.num_heads, attn.num_kv_heads, attn.head_dim):
        raise ValueError(
            f"layer {layer_idx}: HF attention gives {num_heads} query heads, {key.shape[1]} KV "
            f"heads of dim {head_dim}; the KV cache was sized for {attn.num_heads}, "
            f"{attn.num_kv_heads}, {attn.head_dim}")
    # Per-call parameters, exactly as HF would apply them.
    attn.scale = head_dim**-0.5 if scaling is None else float(scaling)
    attn.logits_soft_cap = softcap or None
    attn.sliding_window = sliding_window or None
    attn.sinks = kwargs.get("s_aux")
    q = query[0].transpose(0, 1).reshape(num_tokens, num_heads * head_dim)
    k = key[0].transpose(0, 1).reshape(num_tokens, -1)
    v = value[0].transpose(0, 1).reshape(num_tokens, -1)
    out = attn(q, k, v, step.metadata).view(num_tokens, num_heads, head_dim)
    if step.spans:
        from tritonforge.models.transformers_multimodal import bidirectional_fixup

        out = bidirectional_fixup(attn, q.view(num_tokens, num_heads, head_dim), out,
                                  step.metadata, step.spans)
    step.calls += 1
    return out.view(1, num_tokens, num_heads, head_dim), None


transformers.AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)

EXPERTS_IMPLEMENTATION = "tritonforge_fused_moe"


def _fused_moe_activation(experts: nn.Module) -> str | None:
    """The fused_moe activation of an HF experts module our kernel computes exactly, or None
    (biases, transposed or interleaved gate_up, a custom gate such as gpt-oss's clamped
    SwiGLU, an activation the kernel lacks)."""
    from transformers.integrations.moe import _default_apply_gate

    plain = (getattr(experts, "has_gate", False) and getattr(experts, "is_concatenated", False)
             and not getattr(experts, "is_transposed", True)
             and not getattr(experts, "has_bias", True)
             # (older transformers lack the attribute, and the feature)
             and not getattr(experts, "has_post_expert_norm", False)
             and type(experts)._apply_gate is _default_apply_gate)
    act = getattr(experts, "act_fn", None)
    return "silu" if plain and type(act) in (nn.SiLU, transformers.activations.SiLUActivation) \
        else None


def fused_experts_forward(experts: nn.Module, hidden_states: torch.Tensor,
                          top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts-interface signature run as our fused MoE kernel (one grouped GEMM
    launch per projection, no host sync: decode steps stay CUDA-graph capturable); experts
    the kernel does not compute exactly run transformers' own grouped_mm path."""
    # hidden_states: [T, H], top_k_*: [T, k] -> [T, H]
    from transformers.integrations.moe import grouped_mm_experts_forward

    activation = _fused_moe_activation(experts)
    if activation is None:
        return grouped_mm_experts_forward(experts, hidden_states, top_k_index, top_k_weights)
    moe = fused_moe if use_triton(hidden_states) else fused_moe_ref
    return moe(hidden_states, experts.gate_up_proj, experts.down_proj, top_k_weights,
               top_k_index, activation)


transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION,
                                                             fused_experts_forward)


def unhonoured_attention_keywords(model: nn.Module) -> dict[str, list[str]]:
    """{attention class: keywords its forward passes to the attention function that
    HONOURED_KEYWORDS lacks}, for the modules that attend through our implementation; read
    from each class's source, so a model is refused at load, before any request."""
    import ast
    import inspect
    import textwrap

    found: dict[str, list[str]] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        name = type(module).__name__
        if name in found or getattr(config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(type(module).forward)))
        except (OSError, TypeError, SyntaxError):
            continue
        keywords = {kw.arg for node in ast.walk(tree) if isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Name) and node.func.id == "attention_interface"
                    for kw in node.keywords if kw.arg}
        if keywords - HONOURED_KEYWORDS:
            found[name] = sorted(keywords - HONOURED_KEYWORDS)
    return found


def _code_key(function: Any) -> tuple[Any, ...] | None:
    code = getattr(function, "__code__", None)
    if code is None:
        return None
    return (code.co_code, code.co_consts, code.co_names, code.co_varnames)


_LLAMA_RMS_NORM = _code_key(LlamaRMSNorm.forward)


class FusedRMSNorm(nn.Module):
    """An HF RMSNorm whose forward is exactly LlamaRMSNorm's (Llama, Qwen2/3, Mistral, Phi3,
    Granite, ...: the "Copied from" family), run as our one-kernel rms_norm on CUDA.

    Why: HF's norm is ~7 kernels (upcast, square, mean, rsqrt, two multiplies, downcast),
    twice per layer (plus Qwen3's q/k norms); inside a decode CUDA graph each still costs a
    few microseconds, which is most of the backend's gap to native. Elsewhere (CPU, meta,
    or an input dtype that HF would promote against the weight) it runs HF's own forward,
    so CPU results are bit-identical to transformers. On CUDA the one difference is
    rounding: HF rounds the normalized value to the input dtype before the weight multiply,
    the kernel rounds once at the end (the same in float32; at most an ulp apart in bf16).
    """

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight  # the same Parameter: checkpoint names are unchanged
        self.variance_epsilon = norm.variance_epsilon

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # hidden_states: [..., H] -> [..., H]
        if not use_triton(hidden_states) or hidden_states.dtype != self.weight.dtype:
            return LlamaRMSNorm.forward(self, hidden_states)
        shape = hidden_states.shape
        out = rms_norm(hidden_states.reshape(-1, shape[-1]), self.weight, self.variance_epsilon)
        return out.view(shape)


def fuse_rms_norms(model: nn.Module) -> int:
    """Swaps every submodule whose forward is LlamaRMSNorm's code for a FusedRMSNorm (found
    by comparing bytecode, not names: Gemma's `1 + weight` norm never matches); returns how
    many were swapped."""
    matches = [name for name, module in model.named_modules()
               if _code_key(getattr(type(module), "forward", None)) == _LLAMA_RMS_NORM
               and isinstance(getattr(module, "weight", None), nn.Parameter)
               and module.weight.dim() == 1 and hasattr(module, "variance_epsilon")]
    for name in matches:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FusedRMSNorm(getattr(parent, child)))
    return len(matches)


def num_kv_heads_of(config: Any) -> int:
    """KV heads, including configs that describe them another way (Falcon's multi_query)."""
    num_heads = config.num_attention_heads
    if getattr(config, "num_key_value_heads", None):
        return config.num_key_value_heads
    if hasattr(config, "multi_query") or hasattr(config, "new_decoder_architecture"):
        if getattr(config, "new_decoder_architecture", False):
            return getattr(config, "num_kv_heads", None) or num_heads
        return 1 if getattr(config, "multi_query", False) else num_heads
    return getattr(config, "num_kv_heads", None) or num_heads


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _hf_causal_lm_class(config: Any) -> type | None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None


class TransformersForCausalLM(nn.Module):
    """An HF causal LM whose attention runs on the engine's paged KV cache."""

    is_multimodal = False
    supports_tensor_parallel = True  # by transformers' own tp_plan (models/transformers_tp.py)
    _auto_class = transformers.AutoModelForCausalLM

    @classmethod
    def _hf_class(cls, config: Any) -> type | None:
        return _hf_causal_lm_class(config)

    @classmethod
    def _attn_implementation(cls, config: Any) -> Any:
        return ATTN_IMPLEMENTATION

    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        from transformers.initialization import no_init_weights

        architecture = (getattr(config, "architectures", None) or [type(config).__name__])[0]
        hf_class = self._hf_class(config)
        if hf_class is None:
            raise ValueError(f"{architecture}: transformers has no causal-LM class for model_type "
                             f"{getattr(config, 'model_type', None)!r}; the Transformers backend "
                             "serves decoder-only *ForCausalLM models")
        if not getattr(hf_class, "_supports_attention_backend", False):
            raise ValueError(
                f"{architecture} ({hf_class.__name__}) does not route its attention through "
                "transformers' attention interface, so the Transformers backend cannot put it on "
                "the paged KV cache; it needs a native implementation")
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(text, "kv_lora_rank", None):  # DeepSeek-V2/V3, Kimi-K2, GLM-4.5-MoE-Lite
            raise ValueError(
                f"{architecture} uses Multi-head Latent Attention (a compressed KV latent; "
                f"queries and keys of {getattr(text, 'qk_head_dim', '?')} dims, values of "
                f"{getattr(text, 'v_head_dim', '?')}), whose expanded keys and values the "
                "paged KV cache does not hold; the native DeepSeek-V2/V3 models cache the "
                "latent instead (model_impl='native' or 'auto')")
        self.config = config
        self.architecture = architecture
        hf_config = copy.deepcopy(config)
        hf_config.use_cache = False
        with no_init_weights():  # every parameter is overwritten by the checkpoint
            self.model = self._auto_class.from_config(
                hf_config, dtype=dtype, attn_implementation=self._attn_implementation(config),
                experts_implementation=EXPERTS_IMPLEMENTATION)
        if getattr(hf_config, "tie_word_embeddings", False):
            self.model.tie_weights()  # no_init_weights skips post_init's tying
        if unhonoured := unhonoured_attention_keywords(self.model):
            details = "; ".join(f"{cls} passes {', '.join(kws)}" for cls, kws in unhonoured.items())
            raise ValueError(
                f"{architecture}: {details} to its attention function, which the Transformers "
                "backend's paged attention does not apply (position biases, sparse indices, "
                "...); serving it would silently change the model's output, so it "
                "needs a native implementation")
        self.num_fused_norms = fuse_rms_norms(self.model)
        self.model.eval()
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        tp = current_group()
        num_heads, head_dim = text.num_attention_heads, head_dim_of(text)
        num_kv_heads = num_kv_heads_of(text)
        # At tensor_parallel_size > 1: this rank's slice of each planned linear, cut at load.
        self.tp_slicers = shard_by_tp_plan(self.model, text, head_dim, tp)
        num_heads = divide(num_heads, tp.size, "num_attention_heads")
        num_kv_heads = kv_heads_per_rank(num_kv_heads, tp.size)
        # Scale, window and soft-cap are set per call from HF's own arguments.
        self.attn_layers = nn.ModuleList(
            Attention(num_heads, head_dim, head_dim**-0.5, num_kv_heads)
            for _ in range(text.num_hidden_layers))
        self.final_logit_softcapping = getattr(text, "final_logit_softcapping", None)
        self.logit_scale = getattr(text, "logit_scale", None)  # Cohere: multiply
        self.logits_scaling = getattr(text, "logits_scaling", None)  # Granite: divide

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        # input_ids, positions: [N] int64 -> hidden states [N, H]
        step = _Step(self.attn_layers, attn_metadata)
        token = _STEP.set(step)
        try:
            out = self.model.base_model(input_ids=input_ids[None], position_ids=positions[None],
                                        use_cache=False, return_dict=True)
        finally:
            _STEP.reset(token)
        self._check_calls(step)
        return out.last_hidden_state[0]

    def _check_calls(self, step: _Step) -> None:
        if step.calls != len(self.attn_layers):
            raise RuntimeError(
                f"{self.architecture}: {step.calls} of {len(self.attn_layers)} attention layers "
                f"called the {ATTN_IMPLEMENTATION} attention; the others bypass the paged KV "
                "cache, so the Transformers backend cannot serve this model")

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # hidden_states: [S, H] -> logits [S, V] float32
        logits = self.model.get_output_embeddings()(hidden_states).float()
        if self.logit_scale:
            logits = logits * self.logit_scale
        if self.logits_scaling:
            logits = logits / self.logits_scaling
        if self.final_logit_softcapping:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Loads HF-named tensors (the HF model's own state-dict names) into `self.model`;
        returns the loaded parameter names as `named_parameters()` of this module gives them."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            dot_natural_key,
            rename_source_key,
        )

        # HF's own key renamings (checkpoints saved by older transformers, legacy gamma/beta,
        # GPT-NeoX's embed_out -> lm_head) and weight conversions (the Hub's per-expert MoE
        # tensors fused into one [E, ...] parameter), as from_pretrained applies them.
        transforms = get_model_conversion_mapping(self.model)
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
        meta_state_dict = self.model.state_dict()
        base_prefix = self.model.base_model_prefix or None
        params = dict(self.model.named_parameters(remove_duplicate=False))
        buffers = dict(self.model.named_buffers(remove_duplicate=False))
        canonical = {id(p): "model." + n for n, p in self.model.named_parameters()}
        loaded: set[str] = set()

        def load_one(name: str, tensor: torch.Tensor) -> bool:
            """Copies one HF-named tensor into its parameter or buffer; False if none."""
            if name in self.tp_slicers:
                tensor = self.tp_slicers[name](tensor)
            param = params.get(name)
            if param is None:
                if name in buffers:
                    _copy(buffers[name], tensor, name)
                    return True
                return any(pattern in name for pattern in _SKIP)
            if canonical[id(param)] != "model." + name and canonical[id(param)] in loaded:
                return True  # a tied alias (lm_head of a tied model): the embedding wins
            _copy(param, tensor, name)
            loaded.add(canonical[id(param)])
            return True

        unexpected: list[str] = []
        # target parameter -> its (checkpoint name, source pattern, tensor): converted once
        # the whole checkpoint was read (a target's sources may sit in any shard), so the
        # expert tensors wait in host memory until then.
        pending: dict[str, list[tuple[str, str, torch.Tensor]]] = {}
        for checkpoint_name, tensor in weights:
            name, pattern = rename_source_key(checkpoint_name, renamings, converters,
                                              base_prefix, meta_state_dict)
            if pattern is not None and name in meta_state_dict:
                pending.setdefault(name, []).append((checkpoint_name, pattern, tensor))
            elif not load_one(name, tensor):
                unexpected.append(checkpoint_name if pattern is not None else name)
        for target, sources in pending.items():
            converter = copy.deepcopy(by_pattern[sources[0][1]])
            # In expert order (experts.2 before experts.10), as from_pretrained sorts them.
            for checkpoint_name, pattern, tensor in sorted(
                    sources, key=lambda source: dot_natural_key(source[0])):
                converter.add_tensor(target, checkpoint_name, pattern, tensor)
            try:
                converted = converter.convert(target, model=self.model, config=self.model.config)
            except Exception as err:  # the ops raise anything from shape errors to KeyError
                raise ValueError(f"{self.architecture}: transformers' weight conversion into "
                                 f"{target!r} failed ({err})") from err
            for name, value in converted.items():
                if not load_one(name, value[0] if isinstance(value, list) else value):
                    unexpected.append(name)
        if unexpected:
            raise ValueError(f"{type(self).__name__} ({self.architecture}) has no parameter for "
                             f"checkpoint tensor(s): {', '.join(sorted(unexpected)[:10])}")
        return loaded


@torch.no_grad()
def _copy(target: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    if target.shape != tensor.shape:
        raise ValueError(f"checkpoint tensor {name!r}: expected shape {tuple(target.shape)}, "
                         f"got {tuple(tensor.shape)}")
    target.data.copy_(tensor)
