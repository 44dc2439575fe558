import math

import pytest
import torch

from kilter.errors import ConfigError
from kilter.ops import (
    AdaptiveKLController,
    FixedKLController,
    build_token_rewards,
    kl_estimate,
    last_token_index,
)


def test_kl_estimators_by_hand():
    # pi(token) = 0.5, ref(token) = 0.25: log ratio = ln 2
    logp = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    ln2 = math.log(2)
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(ln2)
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5 * ln2**2)  # 0.2402
    # r = ref / pi = 0.5: (0.5 - 1) - ln 0.5 = ln 2 - 0.5 = 0.1931
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(ln2 - 0.5)


def test_k1_and_k3_are_unbiased_exactly():
    # Expectation under pi over a 4-token vocabulary, computed exactly rather than sampled.
    pi = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    ref = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    true_kl = (pi * (pi / ref).log()).sum()
    for kind in ("k1", "k3"):
        expected = (pi * kl_estimate(pi.log(), ref.log(), kind)).sum()
        assert expected.item() == pytest.approx(true_kl.item(), rel=1e-12)
    # k2 is biased: here it differs from the true KL
    k2 = (pi * kl_estimate(pi.log(), ref.log(), "k2")).sum()
    assert abs(k2.item() - true_kl.item()) > 1e-3


def test_k2_k3_are_non_negative_and_k1_is_not():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(50, 20, generator=g)
    ref = torch.randn(50, 20, generator=g)
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    assert (kl_estimate(logp, ref, "k2") >= 0).all()
    assert (kl_estimate(logp, ref, "k1") < 0).any()
    # equal policies: all three are exactly 0
    for kind in ("k1", "k2", "k3"):
        assert torch.all(kl_estimate(logp, logp, kind) == 0)


def test_kl_unknown_kind():
    with pytest.raises(ConfigError, match="k4"):
        kl_estimate(torch.zeros(1, 1), torch.zeros(1, 1), "k4")  # type: ignore[arg-type]


def test_last_token_index():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0], [0, 1, 0]])
    assert last_token_index(mask).tolist() == [2, 1, -1, 1]


def test_build_token_rewards_by_hand():
    seq = torch.tensor([1.0, 2.0, 3.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 9.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    out = build_token_rewards(seq, kl, mask, beta=0.5)
    # row 0: -0.05, -0.1, -0.15 + 1; row 1: -0.25, -0.25 + 2, pad 0; row 2 empty: no score
    expected = torch.tensor([[-0.05, -0.1, 0.85], [-0.25, 1.75, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(out, expected)


def test_adaptive_kl_controller_by_hand():
    # above target: error = 9/6 - 1 = 0.5, clipped to 0.2; beta = 0.1 * (1 + 0.2 * 256 / 10000)
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert c.update(9.0, 256) == pytest.approx(0.1 * 1.00512)
    assert c.beta > 0.1
    # below target: error -0.2 -> 0.1 * (1 - 0.00512)
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(torch.tensor(3.0), 256)
    assert c.beta == pytest.approx(0.1 * 0.99488)
    # inside the clip: error 6.6/6 - 1 = 0.1 -> 0.1 * (1 + 0.1 * 0.0256)
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(6.6, 256)
    assert c.beta == pytest.approx(0.1 * 1.00256)
    # on target: unchanged
    c.update(6.0, 256)
    assert c.beta == pytest.approx(0.1 * 1.00256)


def test_kl_controllers_state_roundtrip_and_fixed():
    c = AdaptiveKLController(0.2, target=1.0, horizon=100)
    c.update(5.0, 50)
    restored = AdaptiveKLController(0.01, target=3.0, horizon=7)
    restored.load_state_dict(c.state_dict())
    assert (restored.beta, restored.target, restored.horizon) == (c.beta, 1.0, 100)
    f = FixedKLController(0.05)
    assert f.update(100.0, 1000) == 0.05 and f.beta == 0.05
    f2 = FixedKLController(1.0)
    f2.load_state_dict(f.state_dict())
    assert f2.beta == 0.05


@pytest.mark.parametrize("args", [(-0.1, 6.0, 100), (0.1, 0.0, 100), (0.1, 6.0, 0)])
def test_adaptive_kl_controller_rejects_bad_settings(args):
    with pytest.raises(ConfigError):
        AdaptiveKLController(*args)
