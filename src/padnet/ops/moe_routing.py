"""Token routing for mixture-of-experts layers: scores, top-k selection, balancing losses.

Pure functions on tensors (no modules, no state); the MoE layers in
:mod:`padnet.layers.moe` own the router parameters and call these.

Notation: ``N`` tokens, ``E`` experts, ``k`` experts per token, router logits
``z`` ``[N, E]``.

- scores: ``"softmax"``: ``s = softmax(z)``; ``"sigmoid"``: ``s = sigmoid(z)``
  (each expert scored independently, DeepSeek-V3 style).
- selection: the ``k`` experts with the largest ``s + b`` where ``b`` ``[E]`` is
  an optional *selection bias* (auxiliary-loss-free balancing); ``b`` never
  enters the gates.
- gates: the selected ``s``, divided by their sum when ``normalize`` (for
  softmax scores that equals a softmax over the selected logits).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "SCORE_FUNCTIONS",
    "route_tokens",
    "expert_distribution",
    "switch_load_balancing_loss",
    "cv_squared",
    "cv2_balancing_loss",
    "router_z_loss",
    "noisy_top_k_load",
    "sign_bias_update",
]

SCORE_FUNCTIONS = ("softmax", "sigmoid")


def route_tokens(
    logits: Tensor,
    top_k: int,
    normalize_gates: bool = True,
    *,
    score: str = "softmax",
    selection_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k routing.

    Args:
        logits: ``[N, E]`` router logits.
        top_k: experts per token.
        normalize_gates: renormalise the chosen scores to sum to one.
        score: ``"softmax"`` or ``"sigmoid"`` (see the module docstring).
        selection_bias: optional ``[E]`` bias added to the scores for the
            top-k choice only.

    Returns:
        ``(topk_idx [N, k] long, topk_gates [N, k] in logits.dtype, scores [N, E])``
        where ``scores`` (softmax probabilities or sigmoid scores) are computed in
        ``promote(logits.dtype, float32)``.
    """
    if score not in SCORE_FUNCTIONS:
        raise ValueError(f"unknown router score {score!r}; expected one of {SCORE_FUNCTIONS}")
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    z = logits.to(compute_dtype)
    scores = torch.softmax(z, dim=-1) if score == "softmax" else torch.sigmoid(z)
    if selection_bias is None:
        topk_scores, topk_idx = torch.topk(scores, top_k, dim=-1)
    else:
        _, topk_idx = torch.topk(scores + selection_bias.detach().to(compute_dtype), top_k, dim=-1)
        topk_scores = scores.gather(1, topk_idx)
    if normalize_gates:
        topk_scores = topk_scores / topk_scores.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(compute_dtype).tiny)
    return topk_idx, topk_scores.to(logits.dtype), scores


def expert_distribution(scores: Tensor, score: str) -> Tensor:
    """Per-token distribution over experts ``[N, E]`` (rows sum to one) from router scores."""
    if score == "softmax":
        return scores
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


def switch_load_balancing_loss(probs: Tensor, counts: Tensor, top_k: int) -> Tensor:
    """Switch Transformer load-balancing loss ``E * sum_e f_e * P_e``.

    ``f_e = counts_e / (N * top_k)`` is the fraction of (token, slot) assignments
    routed to expert ``e`` (no gradient), ``P_e`` the mean router probability of
    ``e`` over the ``N`` tokens (``probs`` ``[N, E]``, rows summing to one).
    Equals 1 for perfectly uniform routing. Returns 0 for ``N = 0``.
    """
    n, num_experts = probs.shape
    if n == 0:
        return probs.new_zeros(())
    f = counts.to(probs.dtype) / float(n * top_k)
    p = probs.mean(dim=0)
    return num_experts * torch.sum(f * p)


def cv_squared(values: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation ``var(v) / (mean(v)^2 + eps)`` (unbiased variance; 0 for one value)."""
    v = values.to(torch.promote_types(values.dtype, torch.float32))
    if v.numel() <= 1:
        return v.new_zeros(())
    return v.var() / (v.mean() ** 2 + eps)


def cv2_balancing_loss(topk_idx: Tensor, topk_gates: Tensor, load: Tensor, num_experts: int) -> Tensor:
    """Balancing loss of the official PAD-Net MoE code: ``cv^2(importance) + cv^2(load)``.

    ``importance_e = sum_n gate_{n,e}`` (the gates scattered to ``[N, E]``, with
    gradient) and ``load`` ``[E]`` is the number of tokens per expert or, for
    noisy top-k in training, its smooth estimate :func:`noisy_top_k_load`.
    """
    acc = torch.promote_types(topk_gates.dtype, torch.float32)
    importance = torch.zeros(num_experts, dtype=acc, device=topk_gates.device)
    importance = importance.index_add(0, topk_idx.reshape(-1), topk_gates.reshape(-1).to(acc))
    return cv_squared(importance) + cv_squared(load.to(acc))


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss ``mean_n (logsumexp_e z_{n,e})^2`` (0 for ``N = 0``)."""
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=torch.promote_types(logits.dtype, torch.float32))
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.logsumexp(z, dim=-1).pow(2).mean()


def noisy_top_k_load(clean: Tensor, noisy: Tensor, noise_std: Tensor, top_k: int) -> Tensor:
    """Smooth expert load of noisy top-k gating (Shazeer et al. 2017), ``[E]``.

    For each token and expert, the probability (over a fresh draw of that
    expert's noise) that the expert would still be in the top k given the other
    experts' noisy logits: ``Phi((clean - threshold) / noise_std)`` where the
    threshold is the k-th largest noisy logit of the *other* experts. Summed
    over tokens. Requires ``top_k < E``.
    """
    num_experts = clean.shape[-1]
    if not top_k < num_experts:
        raise ValueError(f"noisy_top_k_load needs top_k < num_experts, got {top_k} >= {num_experts}")
    top_vals = torch.topk(noisy, top_k + 1, dim=-1).values  # [N, k+1]
    threshold_if_in = top_vals[:, top_k : top_k + 1]  # k+1-th: the bar an expert inside must stay above
    threshold_if_out = top_vals[:, top_k - 1 : top_k]  # k-th: the bar an expert outside must beat
    is_in = noisy > threshold_if_in
    std_normal_cdf = lambda t: 0.5 * (1.0 + torch.erf(t / math.sqrt(2.0)))  # noqa: E731
    prob_in = std_normal_cdf((clean - threshold_if_in) / noise_std)
    prob_out = std_normal_cdf((clean - threshold_if_out) / noise_std)
    return torch.where(is_in, prob_in, prob_out).sum(dim=0)


def sign_bias_update(bias: Tensor, load: Tensor, rate: float) -> None:
    """Auxiliary-loss-free balancing step, in place: ``b_e += rate * sign(mean(load) - load_e)``.

    ``load`` ``[E]``: tokens routed to each expert since the last update. A
    no-op when no token was routed.
    """
    load = load.to(torch.float64)
    if float(load.sum()) == 0.0:
        return
    with torch.no_grad():
        bias.add_((rate * torch.sign(load.mean() - load)).to(bias.dtype))
