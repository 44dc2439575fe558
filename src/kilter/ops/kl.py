"""KL penalty to the reference policy: per-token estimators, token rewards, beta controllers."""

from __future__ import annotations

from typing import Any, Literal

import torch

from kilter.errors import ConfigError

KLKind = Literal["k1", "k2", "k3"]
KLPlacement = Literal["reward", "loss"]


def kl_placement(kind: KLKind) -> KLPlacement:
    """Where an estimator's penalty must enter the objective so that its gradient pulls toward pi_0.

    For tokens y ~ pi and a per-token estimate k(y), the policy gradient of a *reward* term
    -beta * k (held constant) is -beta * E[grad log pi(y) * k(y)].  That equals
    -beta * grad KL(pi || pi_0) only for k1 = log pi - log pi_0 (Ziegler et al. 2019; InstructGPT),
    so k1 goes into the reward.  k2 and k3 go into the *loss* as differentiable terms on the
    current policy's log-probs (Shao et al. 2024, eq. 3):

    - k2 = 0.5 (log pi - log pi_0)^2: E[grad k2] = E[(log pi - log pi_0) grad log pi]
      = grad KL(pi || pi_0), the same divergence as k1 in the reward;
    - k3 = pi_0/pi - 1 - log(pi_0/pi): E[grad k3] = E[(1 - pi_0/pi) grad log pi]
      = -sum_y pi_0(y) grad log pi(y) = grad KL(pi_0 || pi), the *reverse* KL.

    As a reward, k3's expected gradient E[grad log pi * k3] is nearly orthogonal to either KL's
    gradient near pi_0 (Tang & Munos 2025), and k1 as a loss has zero expected gradient
    (E[grad log pi] = 0); neither placement is offered.  Per token, the loss terms treat the
    sampled prefix as fixed: their gradient is that of the sum over visited states of the
    per-state divergence, not of the sequence-level KL (the reward placement of k1 is).
    """
    if kind == "k1":
        return "reward"
    if kind in ("k2", "k3"):
        return "loss"
    raise ConfigError(f"KL estimator must be one of 'k1', 'k2', 'k3', got {kind!r}")


def kl_gradient_follows(kind: KLKind) -> str:
    """The divergence whose gradient the penalty's expected update follows (see :func:`kl_placement`)."""
    return {"k1": "KL(pi || pi_0)", "k2": "KL(pi || pi_0)", "k3": "KL(pi_0 || pi)"}[kind]


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: KLKind = "k1") -> torch.Tensor:
    """Per-token single-sample estimate of KL(pi || ref) for tokens sampled from pi.

    logp, ref_logp: (B, T) log-probabilities of the sampled tokens -> (B, T).
    From J. Schulman, "Approximating KL Divergence" (2020), with log r = ref_logp - logp:

    - ``k1 = -log r = logp - ref_logp``: unbiased, but single samples can be negative and
      its variance is high.  This is the InstructGPT / Ziegler et al. penalty.
    - ``k2 = 0.5 * (log r)^2``: always >= 0, low variance, biased (its expectation is an
      f-divergence that matches KL only to second order when pi is close to ref).
    - ``k3 = (r - 1) - log r``: unbiased *and* always >= 0 (log is concave, so
      log r <= r - 1), low variance.  Used by GRPO.
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind == "k3":
        # expm1 keeps precision when the policies agree (r close to 1).
        return torch.expm1(-log_ratio) + log_ratio
    raise ConfigError(f"KL estimator must be one of 'k1', 'k2', 'k3', got {kind!r}")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last masked-in position of each row, -1 for an empty row.

    mask: (B, T) -> (B,) long.  Works for right padding and for any other layout.
    """
    positions = torch.arange(1, mask.shape[-1] + 1, device=mask.device)
    return (torch.where(mask != 0, positions, 0)).amax(dim=-1) - 1


def build_token_rewards(
    seq_rewards: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """Per-token rewards for PPO: -beta * KL at every token, plus the score at the end.

    seq_rewards: (B,) one scalar per response (reward model, rule, ...); kl: (B, T)
    per-token KL estimate (see :func:`kl_estimate`); mask: (B, T) -> (B, T), 0 on padding.
    Ziegler et al. 2019 and Ouyang et al. 2022 eq. 2: R(x, y) = r(x, y) - beta * log(pi/ref),
    with the sequence-level score placed on the last real token (the EOS when there is one).
    Rows with an empty mask get no score.
    """
    rewards = torch.where(mask != 0, -beta * kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    last = last_token_index(mask)
    has_tokens = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has_tokens]
    rewards = rewards.index_put(
        (rows, last[has_tokens]), seq_rewards[has_tokens].to(rewards.dtype), accumulate=True
    )
    return rewards


class FixedKLController:
    """A constant KL coefficient with the same interface as :class:`AdaptiveKLController`."""

    def __init__(self, beta: float) -> None:
        if beta < 0:
            raise ConfigError(f"kl beta must be >= 0, got {beta}")
        self.beta = float(beta)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        return self.beta

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "fixed", "beta": self.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta = float(state["beta"])


class AdaptiveKLController:
    """Adapt beta so the observed KL tracks a target (Ziegler et al. 2019, section 2.2).

    error = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + error * n_steps / horizon).
    ``n_steps`` is the number of samples (episodes) the KL was measured on, so ``horizon``
    is in samples: a persistent 20% overshoot grows beta by e^0.2 every ``horizon`` samples.
    """

    def __init__(self, init_beta: float, target: float, horizon: int) -> None:
        if init_beta < 0:
            raise ConfigError(f"kl init_beta must be >= 0, got {init_beta}")
        if target <= 0:
            raise ConfigError(f"kl target must be > 0, got {target}")
        if horizon <= 0:
            raise ConfigError(f"kl horizon must be > 0, got {horizon}")
        self.beta = float(init_beta)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        """Move beta towards keeping ``current_kl`` at the target; returns the new beta."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + proportional_error * n_steps / self.horizon
        return self.beta

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "adaptive", "beta": self.beta, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta = float(state["beta"])
        self.target = float(state.get("target", self.target))
        self.horizon = int(state.get("horizon", self.horizon))
