"""Losses as pure functions. Each docstring gives tensor shapes and the source."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def sft_loss(token_logps: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Negative log-likelihood summed over label tokens, divided by `num_tokens`.

    token_logps: [N] log-prob of each label token of a micro-batch. `num_tokens` is the
    count of label tokens in the whole logical batch (all micro-batches), so accumulating
    micro-batch losses gives exactly the token-mean NLL of the logical batch, however it
    is split.
    """
    return -token_logps.sum() / num_tokens


# ---------------------------------------------------------------------------
# Preference losses
#
# Every loss maps one pair to one number: `losses[i]` depends on pair i only. That is
# what lets the DPO recipe clip per-pair gradients for differential privacy, so no loss
# here may mix pairs (no batch means, no batch-wide token counts).
# ---------------------------------------------------------------------------


@dataclass
class PairLogps:
    """Summed response log-probs of a batch of B preference pairs.

    chosen, rejected: [B] policy log-prob of each response, summed over its tokens.
    chosen_tokens, rejected_tokens: [B] number of response tokens (int or float), >= 1.
    ref_chosen, ref_rejected: [B] the same sums under the frozen reference model;
        None for the reference-free losses (`REFERENCE_FREE`).
    """

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None


@dataclass
class PreferenceLossOutput:
    """losses: [B] per-pair loss (the recipe averages over pairs).

    chosen_rewards, rejected_rewards: [B] detached implicit rewards, for metrics only.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


@dataclass(frozen=True)
class LossParams:
    """Hyperparameters of the preference losses (the `dpo` config section passes these).

    beta: inverse temperature of the implicit reward; for `ipo` the regularization
        strength (target margin 1/(2 beta)); for `simpo` the reward scale; for `orpo`
        only the scale of the reported rewards.
    label_smoothing: `cdpo` and `robust` only: epsilon, the assumed probability that a
        pair's preference label is flipped, in [0, 0.5).
    rpo_alpha: `rpo` only: weight of the chosen response's per-token NLL term.
    simpo_gamma: `simpo` only: the target reward margin gamma of the SimPO paper
        (in reward units, not TRL's gamma/beta ratio).
    orpo_lambda: `orpo` only: weight lambda of the odds-ratio term (the paper's lambda;
        TRL passes it as `beta`, here it has its own name).
    """

    beta: float = 0.1
    label_smoothing: float = 0.0
    rpo_alpha: float = 1.0
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1

    def __post_init__(self) -> None:
        problems = []
        if not self.beta > 0:
            problems.append(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            problems.append(
                f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}: it is the "
                "label-flip rate, and at 0.5 the labels carry no information"
            )
        if not self.rpo_alpha >= 0:
            problems.append(f"rpo_alpha must be >= 0, got {self.rpo_alpha}")
        if not self.orpo_lambda >= 0:
            problems.append(f"orpo_lambda must be >= 0, got {self.orpo_lambda}")
        if problems:
            raise ValueError("invalid LossParams: " + "; ".join(problems))


PreferenceLossFn = Callable[[PairLogps, LossParams], PreferenceLossOutput]


def _ref_logratios(logps: PairLogps, name: str) -> tuple[Tensor, Tensor]:
    """[B], [B]: log pi/pi_ref of the chosen and of the rejected response."""
    if logps.ref_chosen is None or logps.ref_rejected is None:
        raise ValueError(
            f"preference loss {name!r} needs reference log-probs (ref_chosen and "
            f"ref_rejected), got None; compute them with the reference model, or use a "
            f"reference-free loss: {sorted(REFERENCE_FREE)}"
        )
    return logps.chosen - logps.ref_chosen, logps.rejected - logps.ref_rejected


def _ref_rewards(
    losses: Tensor, chosen_logratio: Tensor, rejected_logratio: Tensor, beta: float
) -> PreferenceLossOutput:
    """DPO's implicit rewards beta * log pi/pi_ref, [B] each, detached for metrics."""
    return PreferenceLossOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_logratio).detach(),
        rejected_rewards=(beta * rejected_logratio).detach(),
    )


def sigmoid_loss(logps: PairLogps, params: LossParams) -> PreferenceLossOutput:
    """DPO: Rafailov et al. 2023, "Direct Preference Optimization", eq. 7.

    h = (chosen - ref_chosen) - (rejected - ref_rejected)            [B]
    loss = -log sigmoid(beta * h)                                    [B]
    Rewards: beta * (chosen - ref_chosen), beta * (rejected - ref_rejected).
    """
    chosen_lr, rejected_lr = _ref_logratios(logps, "sigmoid")
    h = chosen_lr - rejected_lr
    losses = -F.logsigmoid(params.beta * h)
    return _ref_rewards(losses, chosen_lr, rejected_lr, params.beta)


def cdpo_loss(logps: PairLogps, params: LossParams) -> PreferenceLossOutput:
    """Conservative DPO: Mitchell 2023, "A note on DPO with noisy preferences", eq. 3.

    With eps = label_smoothing, the probability that a label is flipped, and h as in
    `sigmoid_loss`:
    loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)       [B]
    i.e. binary cross-entropy against the smoothed target 1 - eps. eps = 0 is DPO.
    """
    chosen_lr, rejected_lr = _ref_logratios(logps, "cdpo")
    z = params.beta * (chosen_lr - rejected_lr)
    eps = params.label_smoothing
    losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    return _ref_rewards(losses, chosen_lr, rejected_lr, params.beta)


def robust_loss(logps: PairLogps, params: LossParams) -> PreferenceLossOutput:
    """Robust DPO (rDPO): Chowdhury et al. 2024, "Provably Robust DPO", the unbiased loss.

    With eps = label_smoothing (the label-flip rate, < 0.5) and h as in `sigmoid_loss`:
    loss = ((1 - eps) * (-log sigmoid(beta h)) - eps * (-log sigmoid(-beta h))) / (1 - 2 eps)
    [B]. Its expectation over random flips equals the DPO loss on the clean labels; unlike
    `cdpo` it can be negative. eps = 0 is DPO.
    """
    chosen_lr, rejected_lr = _ref_logratios(logps, "robust")
    z = params.beta * (chosen_lr - rejected_lr)
    eps = params.label_smoothing
    losses = ((1 - eps) * -F.logsigmoid(z) - eps * -F.logsigmoid(-z)) / (1 - 2 * eps)
    return _ref_rewards(losses, chosen_lr, rejected_lr, params.beta)


def ipo_loss(logps: PairLogps, params: LossParams) -> PreferenceLossOutput:
    """IPO: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from
    Human Preferences", eq. 17, on per-token-averaged log-ratios (as TRL does).

    h_avg = (chosen - ref_chosen) / chosen_tokens
            - (rejected - ref_rejected) / rejected_tokens             [B]
    loss = (h_avg - 1 / (2 beta))^2                                  [B]
    Rewards: beta * (chosen - ref_chosen), beta * (rejected - ref_rejected) (summed).
    """
    chosen_lr, rejected_lr = _ref_logratios(logps, "ipo")
    h_avg = chosen_lr / logps.chosen_tokens - rejected_lr / logps.rejected_tokens
    losses = (h_avg - 1 / (2 * params.beta)) ** 2
    return _ref_rewards(losses, chosen_lr, rejected_lr, params.beta)


def hinge_loss(logps: PairLogps, params: LossParams) -> PreferenceLossOutput:
    """SLiC hinge: Zhao et al. 2023, "SLiC-HF", the rank-calibration loss on log-ratios.

    With h as in `sigmoid_loss`:
    loss = max(0, 1 - beta * h)                                      [B]
    i.e. a margin of 1/beta on h; zero once beta * h >= 1.
    """
    chosen_lr, rejected_lr = _ref_logratios(logps, "hinge")
    losses = torch.relu(1 - params.beta * (chosen_lr - rejected_lr))
    return _ref_rewards(losses, chosen_lr, rejected_lr, params.beta)


def dpo_norm_loss(logps: PairLogps, params: LossParams) -> PreferenceLossOutput:
    """Length-normalized DPO: DPO (Rafailov et al. 2023, eq. 7) on per-token log-ratios.

    h_avg as in `ipo_loss`:
    loss = -log sigmoid(beta * h_avg)                                [B]
    Rewards: beta * (chosen - ref_chosen), beta * (rejected - ref_rejected) (summed).
    """
    chosen_lr, rejected_lr = _ref_logratios(logps, "dpo_norm")
    h_avg = chosen_lr / logps.chosen_tokens - rejected_lr / logps.rejected_tokens
    losses = -F.logsigmoid(params.beta * h_avg)
    return _ref_rewards(losses, chosen_lr, rejected_lr, params.beta)


def rpo_loss(logps: PairLogps, params: LossParams) -> PreferenceLossOutput:
    """RPO: Pang et al. 2024, "Iterative Reasoning Preference Optimization", DPO + NLL.

    With h as in `sigmoid_loss` and alpha = rpo_alpha (TRL's convention: alpha weights
    the NLL term):
    nll = -chosen / chosen_tokens                                    [B]
    loss = -log sigmoid(beta * h) + alpha * nll                      [B]
    The NLL is the per-token mean over each pair's own chosen response. TRL instead
    averages it over all chosen tokens of the batch, which makes one pair's loss depend on
    the other pairs' lengths; here a pair's loss must depend on that pair only, so that
    per-pair gradients can be clipped for differential privacy.
    """
    chosen_lr, rejected_lr = _ref_logratios(logps, "rpo")
    nll = -logps.chosen / logps.chosen_tokens
    losses = -F.logsigmoid(params.beta * (chosen_lr - rejected_lr)) + params.rpo_alpha * nll
    return _ref_rewards(losses, chosen_lr, rejected_lr, params.beta)


def simpo_loss(logps: PairLogps, params: LossParams) -> PreferenceLossOutput:
    """SimPO: Meng et al. 2024, "SimPO: Simple Preference Optimization with a
    Reference-Free Reward", eq. 6. Reference-free: ref logps are ignored.

    r_c = beta * chosen / chosen_tokens                              [B]
    r_r = beta * rejected / rejected_tokens                          [B]
    loss = -log sigmoid(r_c - r_r - gamma)                           [B], gamma = simpo_gamma
    Rewards: r_c, r_r.
    """
    r_c = params.beta * logps.chosen / logps.chosen_tokens
    r_r = params.beta * logps.rejected / logps.rejected_tokens
    losses = -F.logsigmoid(r_c - r_r - params.simpo_gamma)
    return PreferenceLossOutput(losses, r_c.detach(), r_r.detach())


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, elementwise, accurate over the whole range.

    log1p(-exp(x)) loses all precision as x -> 0 (exp(x) rounds to 1; in float32 already
    for |x| < 6e-8, giving -inf), log(-expm1(x)) loses it as x -> -inf; switch at
    -log 2 (Maechler 2012, "Accurately computing log(1 - exp(-|a|))"). Each branch sees
    an input clamped to its own side, so neither produces inf or NaN gradients.
    """
    cut = -math.log(2.0)
    near_zero = torch.log(-torch.expm1(x.clamp(min=cut)))
    far = torch.log1p(-torch.exp(x.clamp(max=cut)))
    return torch.where(x > cut, near_zero, far)


def orpo_loss(logps: PairLogps, params: LossParams) -> PreferenceLossOutput:
    """ORPO: Hong et al. 2024, "ORPO: Monolithic Preference Optimization without
    Reference Model", eq. 6-7. Reference-free: ref logps are ignored.

    a = chosen / chosen_tokens, b = rejected / rejected_tokens       [B] average log-probs
    log odds(y) = a - log(1 - exp(a))   (a < 0; log(1 - exp(a)) via `_log1mexp`)
    L_OR = -log sigmoid(log odds(chosen) - log odds(rejected))       [B] (eq. 7)
    loss = -a + lambda * L_OR                                        [B] (eq. 6), lambda = orpo_lambda
    Rewards: beta * a, beta * b (as TRL reports them).
    """
    a = logps.chosen / logps.chosen_tokens
    b = logps.rejected / logps.rejected_tokens
    log_odds = (a - _log1mexp(a)) - (b - _log1mexp(b))
    losses = -a - params.orpo_lambda * F.logsigmoid(log_odds)
    return PreferenceLossOutput(losses, (params.beta * a).detach(), (params.beta * b).detach())


PREFERENCE_LOSSES: dict[str, PreferenceLossFn] = {
    "sigmoid": sigmoid_loss,
    "cdpo": cdpo_loss,
    "robust": robust_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "dpo_norm": dpo_norm_loss,
    "rpo": rpo_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
}

# Losses that need no reference model: the recipe can skip loading and running it.
REFERENCE_FREE: frozenset[str] = frozenset({"simpo", "orpo"})


def preference_loss(name: str, logps: PairLogps, params: LossParams) -> PreferenceLossOutput:
    """Per-pair preference loss `name` (a key of `PREFERENCE_LOSSES`); shapes as in `PairLogps`."""
    try:
        loss_fn = PREFERENCE_LOSSES[name]
    except KeyError:
        raise ValueError(
            f"unknown preference loss {name!r}; valid names: {', '.join(PREFERENCE_LOSSES)}"
        ) from None
    return loss_fn(logps, params)
