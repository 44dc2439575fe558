import pytest
import torch

from kilter.errors import ConfigError
from kilter.ops import discounted_returns, gae, grpo_advantages, rloo_advantages


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=2: delta = 1 - 0.7 = 0.3 (terminal)            A = 0.3
    # t=1: delta = 0.9 * 0.7 - 0.6 = 0.03              A = 0.03 + 0.72 * 0.3   = 0.246
    # t=0: delta = 0.9 * 0.6 - 0.5 = 0.04              A = 0.04 + 0.72 * 0.246 = 0.21712
    assert torch.allclose(adv, torch.tensor([[0.21712, 0.246, 0.3]]))
    assert torch.allclose(ret, torch.tensor([[0.71712, 0.846, 1.0]]))


def test_gae_right_padding_bootstraps_zero_and_ignores_garbage():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0, 5.0], [0.0, 2.0, 7.0, 7.0, 7.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 99.0, float("nan")], [1.0, 1.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert torch.allclose(adv[0], torch.tensor([0.21712, 0.246, 0.3, 0.0, 0.0]))
    # row 1: t=1: delta = 2 - 1 = 1 (terminal); t=0: delta = 0.9 * 1 - 1 = -0.1, A = -0.1 + 0.72 = 0.62
    assert torch.allclose(adv[1], torch.tensor([0.62, 1.0, 0.0, 0.0, 0.0]))
    assert torch.allclose(ret[1], torch.tensor([1.62, 2.0, 0.0, 0.0, 0.0]))
    assert torch.isfinite(ret).all()


def test_gae_lambda1_gamma1_is_reward_to_go_minus_value():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(4, 6, generator=g)
    values = torch.randn(4, 6, generator=g)
    lengths = torch.tensor([6, 3, 1, 4])
    mask = (torch.arange(6) < lengths[:, None]).float()
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = torch.flip(torch.cumsum(torch.flip(rewards * mask, [1]), 1), [1]) * mask
    assert torch.allclose(adv, (to_go - values) * mask, atol=1e-5)
    assert torch.allclose(ret, to_go, atol=1e-5)


def test_gae_lambda0_is_one_step_td():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 1.0, 2.0]])
    adv, _ = gae(rewards, values, torch.ones(1, 3), gamma=0.5, lam=0.0)
    # 1 + 0.5 * 1 - 0.5 = 1; 2 + 0.5 * 2 - 1 = 2; 3 - 2 = 1
    assert torch.allclose(adv, torch.tensor([[1.0, 2.0, 1.0]]))


def test_gae_outputs_carry_no_gradient():
    values = torch.ones(1, 3, requires_grad=True)
    adv, ret = gae(torch.ones(1, 3), values, torch.ones(1, 3), 1.0, 0.95)
    assert not adv.requires_grad and not ret.requires_grad


def test_discounted_returns_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0, 8.0], [3.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    # row 0: G2 = 2, G1 = 0 + 0.5 * 2 = 1, G0 = 1 + 0.5 * 1 = 1.5; row 1: only 3
    out = discounted_returns(rewards, mask, gamma=0.5)
    assert torch.allclose(out, torch.tensor([[1.5, 1.0, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0]]))


def test_rloo_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    # group 1 baselines: (2+3)/2, (1+3)/2, (1+2)/2 = 2.5, 2, 1.5 -> -1.5, 0, 1.5
    # group 2 baselines: (0+6)/2, (0+6)/2, 0 -> -3, -3, 6
    out = rloo_advantages(rewards, group_size=3)
    assert torch.allclose(out, torch.tensor([-1.5, 0.0, 1.5, -3.0, -3.0, 6.0]))


def test_grpo_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0, 4.0, 4.0, 4.0])
    # group 1: mean 2, std 1 -> -1, 0, 1
    # group 2: mean 2, deviations -2, -2, 4, var (4+4+16)/2 = 12 -> /sqrt(12)
    # group 3: all equal -> 0 (eps avoids 0/0)
    s = 12**0.5
    out = grpo_advantages(rewards, group_size=3)
    expected = torch.tensor([-1.0, 0.0, 1.0, -2 / s, -2 / s, 4 / s, 0.0, 0.0, 0.0])
    assert torch.allclose(out, expected, atol=1e-5)
    centred = grpo_advantages(rewards, group_size=3, scale=False)
    assert torch.allclose(centred, torch.tensor([-1.0, 0.0, 1.0, -2.0, -2.0, 4.0, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize("fn", [rloo_advantages, grpo_advantages])
def test_group_baselines_reject_bad_group_size(fn):
    with pytest.raises(ConfigError, match="group_size"):
        fn(torch.ones(6), 1)
    with pytest.raises(ConfigError, match="group_size"):
        fn(torch.ones(7), 3)
