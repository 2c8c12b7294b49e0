"""Which experts each token goes to, and with which weights: the routers of the MoE families.

Design: one `Routing` value per model (from its config) and one function, `select_experts`,
so a family's routing is data, not code. The variants:
- softmax over all experts, top-k, optionally renormalised to sum 1 (Mixtral always; Qwen2-MoE,
  Qwen3-MoE and OLMoE by `norm_topk_prob`);
- sigmoid scores with a per-expert correction bias used only for the CHOICE, limited to the
  `topk_group` best of `n_group` expert groups (a group scores the sum of its two best), the
  chosen experts weighted by their uncorrected scores, renormalised and scaled by
  `routed_scaling_factor` (DeepSeek-V3);
- softmax scores, top-k, limited to the `topk_group` best of `n_group` groups where a group
  scores its BEST expert, weights scaled by `routed_scaling_factor` and never renormalised
  (DeepSeek-V2's "group_limited_greedy"; its "greedy" is the plain softmax top-k, scaled);
- top-k of the raw logits, softmax over those k (gpt-oss).
Scores are computed in float32, as transformers computes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCORINGS = ("softmax", "sigmoid", "softmax_of_topk")
GROUP_SCORES = ("top2_sum", "max")


@dataclass(frozen=True)
class Routing:
    top_k: int
    num_experts: int
    scoring: str = "softmax"
    renormalize: bool = False
    num_groups: int = 1  # expert groups (DeepSeek's n_group); 1 means no group limit
    topk_groups: int = 1  # groups a token may use (topk_group)
    scaling: float = 1.0  # routed_scaling_factor
    # What a group scores: the sum of its two best experts (DeepSeek-V3) or its best (V2).
    group_score: str = "top2_sum"

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be between 1 and num_experts "
                             f"({self.num_experts}), got {self.top_k}")
        if self.num_groups < 1 or self.num_experts % self.num_groups:
            raise ValueError(f"n_group ({self.num_groups}) must divide num_experts "
                             f"({self.num_experts})")
        if self.group_score not in GROUP_SCORES:
            raise ValueError(f"group_score must be one of {GROUP_SCORES}, got "
                             f"{self.group_score!r}")
        if not 1 <= self.topk_groups <= self.num_groups:
            raise ValueError(f"topk_group must be between 1 and n_group ({self.num_groups}), "
                             f"got {self.topk_groups}")


def _group_limited(choice: torch.Tensor, routing: Routing) -> torch.Tensor:
    """`choice` with the experts outside each token's `topk_groups` best groups set to -inf."""
    if routing.num_groups == 1:
        return choice
    tokens = choice.shape[0]
    grouped = choice.view(tokens, routing.num_groups, -1)
    if routing.group_score == "max":
        group_scores = grouped.max(dim=-1).values
    else:
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1)[0].sum(-1)
    best = group_scores.topk(routing.topk_groups, dim=-1, sorted=False)[1]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return grouped.masked_fill(~keep[..., None], float("-inf")).view(tokens, -1)


def select_experts(router_logits: torch.Tensor, routing: Routing,
                   correction_bias: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, expert ids [T, k] int64) for router logits [T, E]."""
    logits = router_logits.float()
    if routing.scoring == "softmax_of_topk":
        top_logits, ids = logits.topk(routing.top_k, dim=-1)
        return torch.softmax(top_logits, dim=-1), ids
    scores = torch.softmax(logits, -1) if routing.scoring == "softmax" else logits.sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    ids = _group_limited(choice, routing).topk(routing.top_k, dim=-1)[1]
    weights = scores.gather(1, ids)
    if routing.renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * routing.scaling if routing.scaling != 1.0 else weights, ids
