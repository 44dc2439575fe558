"""Reward-model losses: Bradley-Terry on comparison pairs and on K-way rankings (phase 2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected - margin) (Ouyang et al. 2022, eq. 1).

    r_chosen, r_rejected: (N,) scalar rewards of the preferred and the other response;
    margin: (N,) or None -- the Llama 2 margin (Touvron et al. 2023, eq. 2), larger for
    pairs the labeler judged clearly better, so the model must separate them further.
    Returns a 0-dim loss.
    """
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    return -F.logsigmoid(diff).mean()


def pair_weights(pair_group: torch.Tensor, independent: torch.Tensor) -> torch.Tensor:
    """Weight of each labeled pair in the reward-model loss.

    pair_group: (P,) long, the group of each pair; independent: (G,) bool per group -> (P,).
    A ranking's (or a prompt's thumbs') C(K, 2) pairs come from one judgment and share one
    unit of weight, 1 / (its number of pairs) each (InstructGPT, Ouyang et al. 2022, eq. 1: the
    1 / C(K, 2) factor keeps a prompt from counting C(K, 2) times).  Independent comparisons that
    merely share a prompt (grouped only to forward each response once) weigh 1 each, so a prompt
    with many judged comparisons is not down-weighted to one.
    """
    n_groups = independent.shape[0]
    counts = torch.bincount(pair_group, minlength=n_groups).clamp(min=1).to(torch.float64)
    per_group = torch.where(independent.bool(), torch.ones_like(counts), 1.0 / counts)
    return per_group[pair_group]


def weighted_pair_loss(rewards: torch.Tensor, better: torch.Tensor, worse: torch.Tensor, weights: torch.Tensor,
                       margin: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted Bradley-Terry sum over a batch of pairs: (sum_p w_p * l_p, sum_p w_p).

    rewards: (N,) one per response (each forwarded once); better, worse: (P,) row indices;
    weights: (P,) from :func:`pair_weights`; margin: (P,) or None, as in :func:`bradley_terry_loss`.
    l_p = -log sigmoid(r_better - r_worse - margin).  The batch loss is the first sum divided by
    the second, summed over every micro-batch (and rank) of the optimizer step first, so the
    gradient does not depend on how the step is split.
    """
    diff = rewards[better] - rewards[worse]
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    weights = weights.to(diff.dtype)
    return (weights * -F.logsigmoid(diff)).sum(), weights.sum()


def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs where the chosen response scores higher; a tie counts as half.

    r_chosen, r_rejected: (N,) -> 0-dim float (detached).  Counting ties as 0.5 makes a
    constant reward model score 0.5, the chance level, rather than 0.
    """
    r_chosen, r_rejected = r_chosen.detach(), r_rejected.detach()
    wins = (r_chosen > r_rejected).float() + 0.5 * (r_chosen == r_rejected).float()
    return wins.mean()


def ranking_pairs(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """All (better_index, worse_index) pairs of one prompt's ranked responses.

    Rank 1 is best; equal ranks are ties and give no pair.  Pairs come in index order
    (i < j), each oriented better-first.  K responses without ties give C(K, 2) pairs.
    """
    pairs = []
    for i in range(len(ranks)):
        for j in range(i + 1, len(ranks)):
            if ranks[i] < ranks[j]:
                pairs.append((i, j))
            elif ranks[j] < ranks[i]:
                pairs.append((j, i))
    return pairs


def ranking_pair_indices(
    group_index: torch.Tensor, ranks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised :func:`ranking_pairs` over a flat batch of several prompts' responses.

    group_index: (N,) which prompt each response belongs to (any integer ids);
    ranks: (N,) rank within its prompt (1 best, equal = tie)
    -> (better (P,), worse (P,)) long indices into the batch, one entry per non-tied pair
    of responses that share a prompt.  Useful with :func:`pairwise_accuracy`:
    ``pairwise_accuracy(rewards[better], rewards[worse])``.
    """
    same_prompt = group_index.unsqueeze(1) == group_index.unsqueeze(0)
    row_better = ranks.unsqueeze(1) < ranks.unsqueeze(0)
    better, worse = torch.nonzero(same_prompt & row_better, as_tuple=True)
    return better, worse


def kway_bradley_terry_loss(
    rewards: torch.Tensor, group_index: torch.Tensor, ranks: torch.Tensor
) -> torch.Tensor:
    """InstructGPT's K-way ranking loss (Ouyang et al. 2022, eq. 1 and section 3.5).

    rewards: (N,) one scalar per response, each response forwarded once; group_index: (N,)
    long prompt ids; ranks: (N,) long ranks within a prompt (1 best, equal = tie).
    Every non-tied pair of a prompt's responses contributes -log sigmoid(r_better - r_worse);
    a prompt's loss is the mean over its pairs (the 1 / C(K, 2) normalisation, so each
    prompt weighs the same however many pairs it yields), and the result is the mean over
    prompts that have at least one pair.  Returns a 0-dim loss (0 if no pair exists).
    """
    better, worse = ranking_pair_indices(group_index, ranks)
    if better.numel() == 0:
        return rewards.sum() * 0.0
    pair_losses = -F.logsigmoid(rewards[better] - rewards[worse])
    _, prompt_ids = torch.unique(group_index, return_inverse=True)
    pair_prompt = prompt_ids[better]
    n_prompts = int(prompt_ids.max()) + 1
    per_prompt_sum = pair_losses.new_zeros(n_prompts).index_add(0, pair_prompt, pair_losses)
    per_prompt_count = torch.bincount(pair_prompt, minlength=n_prompts)
    has_pairs = per_prompt_count > 0
    return (per_prompt_sum[has_pairs] / per_prompt_count[has_pairs]).mean()
