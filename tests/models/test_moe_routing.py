"""select_experts picks the experts, and weights them, exactly as each family's transformers
router does: Mixtral (softmax, renormalised), Qwen2-MoE/OLMoE (softmax, renormalised or not),
DeepSeek-V2 (softmax, greedy or limited to the groups of the best experts, scaled), DeepSeek-V3
(sigmoid, bias-corrected choice, group-limited, scaled) and gpt-oss (softmax of the top-k
logits). The DeepSeek routings come from the model classes themselves (their configs)."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
from tritonforge.models.deepseek_v2 import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from tritonforge.models.layers.moe_routing import Routing, select_experts

HIDDEN, TOKENS = 32, 57


def _same_choice(ours: tuple[torch.Tensor, torch.Tensor], theirs_weights: torch.Tensor,
                 theirs_ids: torch.Tensor) -> None:
    # Order within a token's k experts is free (sorted=False upstream): compare as sets.
    weights, ids = ours
    order, their_order = ids.argsort(-1), theirs_ids.argsort(-1)
    assert torch.equal(ids.gather(1, order), theirs_ids.gather(1, their_order))
    torch.testing.assert_close(weights.gather(1, order),
                               theirs_weights.float().gather(1, their_order), atol=1e-6, rtol=0)


def _router(cls, config):
    torch.manual_seed(0)
    router = cls(config)
    with torch.no_grad():
        router.weight.normal_()
        for name in ("bias", "e_score_correction_bias"):
            if hasattr(router, name):
                getattr(router, name).copy_(torch.randn_like(getattr(router, name)))
    return router


@pytest.mark.parametrize("norm", [False, True])
def test_softmax_routing_equals_mixtral_and_qwen2_moe(norm) -> None:
    x = torch.randn(TOKENS, HIDDEN)
    if norm:
        config = transformers.MixtralConfig(hidden_size=HIDDEN, num_local_experts=8,
                                            num_experts_per_tok=2)
        router, experts = _router(MixtralTopKRouter, config), 8
    else:
        config = transformers.Qwen2MoeConfig(hidden_size=HIDDEN, num_experts=6,
                                             num_experts_per_tok=3, norm_topk_prob=False)
        router, experts = _router(Qwen2MoeTopKRouter, config), 6
    logits, weights, ids = router(x)
    routing = Routing(config.num_experts_per_tok, experts, renormalize=norm)
    _same_choice(select_experts(logits, routing), weights, ids)


def test_grouped_sigmoid_routing_equals_deepseek_v3() -> None:
    config = transformers.DeepseekV3Config(hidden_size=HIDDEN, n_routed_experts=16,
                                           num_experts_per_tok=4, n_group=4, topk_group=2,
                                           routed_scaling_factor=2.5, norm_topk_prob=True)
    router = _router(DeepseekV3TopkRouter, config)
    x = torch.randn(TOKENS, HIDDEN)
    logits, weights, ids = router(x)
    routing = Routing(4, 16, scoring="sigmoid", renormalize=True, num_groups=4, topk_groups=2,
                      scaling=2.5)
    ours = select_experts(logits, routing, router.e_score_correction_bias)
    _same_choice(ours, weights, ids)
    # The group limit is real: every token's experts come from at most 2 of the 4 groups.
    assert all(len(set((row // 4).tolist())) <= 2 for row in ours[1])
    # ... and the bias moved the choice without entering the weights.
    unbiased = select_experts(logits, routing)
    assert not torch.equal(unbiased[1].sort(-1).values, ours[1].sort(-1).values)


@pytest.mark.parametrize("topk_method", ["greedy", "group_limited_greedy"])
def test_softmax_routing_equals_deepseek_v2(topk_method) -> None:
    # norm_topk_prob=True is ignored by transformers' V2 router: never renormalised.
    config = transformers.DeepseekV2Config(hidden_size=HIDDEN, n_routed_experts=12,
                                           num_experts_per_tok=3, n_group=4, topk_group=2,
                                           topk_method=topk_method, routed_scaling_factor=1.7,
                                           norm_topk_prob=True)
    router = _router(DeepseekV2TopkRouter, config)
    logits, weights, ids = router(torch.randn(TOKENS, HIDDEN))
    routing = DeepseekV2ForCausalLM.routing(config)
    ours = select_experts(logits, routing)
    _same_choice(ours, weights, ids)
    if topk_method == "group_limited_greedy":  # experts of at most 2 of the 4 groups of 3
        assert all(len(set((row // 3).tolist())) <= 2 for row in ours[1])
    with pytest.raises(ValueError, match="topk_method"):
        DeepseekV2ForCausalLM.routing(transformers.DeepseekV2Config(topk_method="noaux_tc"))


def test_deepseek_v3_model_routes_as_its_transformers_router() -> None:
    config = transformers.DeepseekV3Config(hidden_size=HIDDEN, n_routed_experts=16,
                                           num_experts_per_tok=4, n_group=4, topk_group=2,
                                           routed_scaling_factor=2.5, norm_topk_prob=True)
    router = _router(DeepseekV3TopkRouter, config)
    logits, weights, ids = router(torch.randn(TOKENS, HIDDEN))
    routing = DeepseekV3ForCausalLM.routing(config)
    _same_choice(select_experts(logits, routing, router.e_score_correction_bias), weights, ids)


def test_softmax_of_topk_routing_equals_gpt_oss() -> None:
    config = transformers.GptOssConfig(hidden_size=HIDDEN, num_local_experts=8,
                                       num_experts_per_tok=4)
    router = _router(GptOssTopKRouter, config)
    logits, weights, ids = router(torch.randn(TOKENS, HIDDEN))
    _same_choice(select_experts(logits, Routing(4, 8, scoring="softmax_of_topk")), weights, ids)


@pytest.mark.parametrize("kwargs,field", [
    ({"top_k": 9, "num_experts": 8}, "num_experts_per_tok"),
    ({"top_k": 2, "num_experts": 8, "scoring": "relu"}, "scoring"),
    ({"top_k": 2, "num_experts": 8, "num_groups": 3}, "n_group"),
    ({"top_k": 2, "num_experts": 8, "num_groups": 4, "topk_groups": 5}, "topk_group"),
    ({"top_k": 2, "num_experts": 8, "group_score": "min"}, "group_score"),
])
def test_bad_routing_values_name_the_config_field(kwargs, field) -> None:
    with pytest.raises(ValueError, match=field):
        Routing(**kwargs)
