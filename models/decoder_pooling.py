"""Native decoders as pooling models: token states for embeddings (LAST pooling, e.g.
Qwen3-Embedding) and HF's *ForSequenceClassification heads (reward models, classifiers).

Design: the shared decoder (models/llama.py) attends through the paged Attention layer,
which reads K/V from a cache. Pooling keeps no KV cache between calls, so each forward
binds one scratch (k, v) pair, just large enough for this batch's whole prompts, to EVERY
layer: a layer stores its K/V and attends over them before the next layer overwrites the
same slots, so one layer's worth of memory serves all layers. The scratch is unbound after
the forward. Causal masking, sliding windows and soft-capping are the decoder's own, so
pooling computes exactly what generation's prefill computes.

HF's sequence-classification head is `score` (no bias) applied at the last token; HF finds it
as the rightmost token != pad_token_id, we take the last row of each packed sequence (the
same token, also when a prompt itself ends in the pad id).
Each family class only names the causal LM whose DecoderOptions it uses.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from transformers import PretrainedConfig
from tritonforge.models.attention_metadata import AttentionMetadata
from tritonforge.models.deepseek_v2 import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from tritonforge.models.gemma2 import Gemma2ForCausalLM
from tritonforge.models.gemma3 import Gemma3ForCausalLM
from tritonforge.models.gpt_oss import GptOssForCausalLM
from tritonforge.models.layers.attention import PagedKVLayer, bind_kv_cache
from tritonforge.models.layers.fused_moe import load_expert_weights
from tritonforge.models.layers.linear import ReplicatedLinear
from tritonforge.models.llama import LlamaForCausalLM, MistralForCausalLM
from tritonforge.models.mixtral import MixtralForCausalLM
from tritonforge.models.olmoe import OlmoeForCausalLM
from tritonforge.models.phi3 import Phi3ForCausalLM
from tritonforge.models.qwen2 import Qwen2ForCausalLM
from tritonforge.models.qwen3 import Qwen3ForCausalLM
from tritonforge.models.qwen_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM
from tritonforge.models.weight_utils import load_weights, renamed

SCRATCH_BLOCK_SIZE = 16


class DecoderPoolingModel(nn.Module):
    """The decoder of `causal_lm`'s family without its LM head; forward -> [N, H]."""
    supports_tensor_parallel = True  # as far as its causal_lm family does

    causal_lm: type[LlamaForCausalLM] = LlamaForCausalLM
    skip_weights: tuple[str, ...] = ("rotary_emb.inv_freq", "lm_head.", "score.")

    def __init__(self, config: PretrainedConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.hidden_size: int = config.hidden_size
        self.model = self.causal_lm.model_class(config, self.causal_lm.decoder_options(config),
                                                dtype, self.causal_lm.mlp_factory)
        self._attention_layers = [m for m in self.model.modules()
                                  if isinstance(m, PagedKVLayer)]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                seq_start_loc: torch.Tensor, token_type_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        # input_ids, positions: [N]; seq_start_loc: [B + 1] -> hidden states [N, H]
        lens = (seq_start_loc[1:] - seq_start_loc[:-1]).tolist()
        metadata = AttentionMetadata.for_prompts(lens, SCRATCH_BLOCK_SIZE)
        num_blocks = sum(-(-n // SCRATCH_BLOCK_SIZE) for n in lens)
        first = self._attention_layers[0]
        shape = (max(num_blocks, 1), SCRATCH_BLOCK_SIZE, first.num_kv_heads)
        dtype, device = self.model.embed_tokens.weight.dtype, input_ids.device
        # V of width v_head_dim: 0 for MLA, whose K cache holds the latent (the values too).
        scratch = (torch.empty(*shape, first.head_dim, dtype=dtype, device=device),
                   torch.empty(*shape, first.v_head_dim, dtype=dtype, device=device))
        bind_kv_cache(self.model, [scratch] * len(self._attention_layers))
        try:
            return self.model(input_ids, positions, metadata.to(device))
        finally:
            for layer in self._attention_layers:
                layer.kv_cache = None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # MoE families: the per-expert tensors fold into their fused parameters first.
        experts: set[str] = set()
        weights = renamed(self._with_model_prefix(weights), self.causal_lm.checkpoint_renames)
        rest = load_expert_weights(self, weights, experts)
        return load_weights(self, rest, self.causal_lm.packed_modules_mapping,
                            self.skip_weights) | experts

    @staticmethod
    def _with_model_prefix(weights: Iterable[tuple[str, torch.Tensor]]
                           ) -> Iterator[tuple[str, torch.Tensor]]:
        # Embedding checkpoints saved from the base model (Qwen3-Embedding) name the decoder's
        # tensors without the `model.` prefix the causal-LM checkpoints carry.
        for name, tensor in weights:
            if not name.startswith(("model.", "lm_head.", "score.")):
                name = "model." + name
            yield name, tensor


class DecoderForSequenceClassification(DecoderPoolingModel):
    """score(last token state): logits [B, num_labels] float32."""

    skip_weights = ("rotary_emb.inv_freq", "lm_head.")

    def __init__(self, config: PretrainedConfig, dtype: torch.dtype) -> None:
        super().__init__(config, dtype)
        self.num_labels: int = config.num_labels
        self.score = ReplicatedLinear(config.hidden_size, config.num_labels, False, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                seq_start_loc: torch.Tensor, token_type_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        hidden_states = super().forward(input_ids, positions, seq_start_loc)
        return self.score(hidden_states[seq_start_loc[1:].long() - 1]).float()


# ---- embeddings (registered under the causal-LM architecture string) ----------------------
class LlamaEmbeddingModel(DecoderPoolingModel):
    causal_lm = LlamaForCausalLM


class MistralEmbeddingModel(DecoderPoolingModel):
    causal_lm = MistralForCausalLM


class Qwen2EmbeddingModel(DecoderPoolingModel):
    causal_lm = Qwen2ForCausalLM


class Qwen3EmbeddingModel(DecoderPoolingModel):
    causal_lm = Qwen3ForCausalLM


class Gemma2EmbeddingModel(DecoderPoolingModel):
    causal_lm = Gemma2ForCausalLM


class Gemma3EmbeddingModel(DecoderPoolingModel):
    causal_lm = Gemma3ForCausalLM


class Phi3EmbeddingModel(DecoderPoolingModel):
    causal_lm = Phi3ForCausalLM


class MixtralEmbeddingModel(DecoderPoolingModel):
    causal_lm = MixtralForCausalLM


class Qwen2MoeEmbeddingModel(DecoderPoolingModel):
    causal_lm = Qwen2MoeForCausalLM


class Qwen3MoeEmbeddingModel(DecoderPoolingModel):
    causal_lm = Qwen3MoeForCausalLM


class OlmoeEmbeddingModel(DecoderPoolingModel):
    causal_lm = OlmoeForCausalLM


class GptOssEmbeddingModel(DecoderPoolingModel):
    causal_lm = GptOssForCausalLM


class DeepseekV2EmbeddingModel(DecoderPoolingModel):
    causal_lm = DeepseekV2ForCausalLM


class DeepseekV3EmbeddingModel(DecoderPoolingModel):
    causal_lm = DeepseekV3ForCausalLM


# ---- sequence classification (HF's class names) -------------------------------------------
class LlamaForSequenceClassification(DecoderForSequenceClassification):
    causal_lm = LlamaForCausalLM


class MistralForSequenceClassification(DecoderForSequenceClassification):
    causal_lm = MistralForCausalLM


class Qwen2ForSequenceClassification(DecoderForSequenceClassification):
    causal_lm = Qwen2ForCausalLM


class Qwen3ForSequenceClassification(DecoderForSequenceClassification):
    causal_lm = Qwen3ForCausalLM


class Gemma2ForSequenceClassification(DecoderForSequenceClassification):
    causal_lm = Gemma2ForCausalLM


class Gemma3TextForSequenceClassification(DecoderForSequenceClassification):
    causal_lm = Gemma3ForCausalLM


class Phi3ForSequenceClassification(DecoderForSequenceClassification):
    causal_lm = Phi3ForCausalLM
