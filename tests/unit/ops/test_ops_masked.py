import math

import pytest
import torch

from kilter.ops import explained_variance, masked_mean, masked_sum, masked_var, masked_whiten

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_masked_sum_by_hand():
    # 1 + 2 + 4 = 7; per row: 1 + 2 = 3 and 4
    assert masked_sum(X, MASK).item() == 7.0
    assert torch.equal(masked_sum(X, MASK, dim=1), torch.tensor([3.0, 4.0]))
    assert torch.equal(masked_sum(X, MASK.bool(), dim=0), torch.tensor([5.0, 2.0, 0.0]))


def test_masked_mean_by_hand():
    # (1 + 2 + 4) / 3
    assert masked_mean(X, MASK).item() == pytest.approx(7 / 3)
    # rows: (1 + 2) / 2 = 1.5 and 4 / 1
    assert torch.allclose(masked_mean(X, MASK, dim=1), torch.tensor([1.5, 4.0]))


def test_masked_mean_float_weights():
    # (0.5 * 2 + 1 * 4) / (0.5 + 1) = 5 / 1.5
    x = torch.tensor([[2.0, 4.0, 100.0]])
    w = torch.tensor([[0.5, 1.0, 0.0]])
    assert masked_mean(x, w).item() == pytest.approx(10 / 3)


def test_masked_values_ignore_inf_and_nan_in_padding():
    x = torch.tensor([[1.0, float("inf"), float("nan")]])
    mask = torch.tensor([[1.0, 0.0, 0.0]])
    assert masked_mean(x, mask).item() == 1.0
    assert masked_sum(x, mask).item() == 1.0


def test_empty_row_mean_is_zero_not_nan():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert torch.allclose(masked_mean(X, mask, dim=1), torch.tensor([1.5, 0.0]))


def test_masked_var_by_hand():
    # values 1, 2, 4: mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9
    # biased 42/9 / 3 = 14/9; unbiased 42/9 / 2 = 7/3
    assert masked_var(X, MASK, unbiased=False).item() == pytest.approx(14 / 9)
    assert masked_var(X, MASK).item() == pytest.approx(7 / 3)


def test_masked_var_single_element_is_zero_with_finite_grad():
    x = X.clone().requires_grad_(True)
    var = masked_var(x, torch.tensor([[0, 1, 0], [0, 0, 0]]))
    assert var.item() == 0.0
    var.backward()
    assert torch.isfinite(x.grad).all()


def test_masked_whiten_by_hand():
    # on-mask values 1, 3: mean 2, unbiased var (1 + 1) / 1 = 2 -> (x - 2) / sqrt(2)
    x = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 0]])
    s = 1 / math.sqrt(2)
    assert torch.allclose(masked_whiten(x, mask), torch.tensor([[-s, s, 0.0]]), atol=1e-6)
    # shift_mean=False keeps the mean 2: 2 -/+ 1/sqrt(2)
    kept_mean = masked_whiten(x, mask, shift_mean=False)
    assert torch.allclose(kept_mean, torch.tensor([[2 - s, 2 + s, 0.0]]), atol=1e-6)


def test_masked_whiten_property_mean0_var1():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, generator=g) * 3 + 5
    mask = (torch.rand(6, 9, generator=g) > 0.3).float()
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-5)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.all(w[mask == 0] == 0)


def test_explained_variance_by_hand():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, 50.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    assert explained_variance(returns.clone(), returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.5), returns, mask) == pytest.approx(0.0)
    # residuals 0, 0, 0, -1: unbiased var 0.75 / 3 = 0.25; var(returns) = 5/3 -> 1 - 0.15
    values = torch.tensor([[1.0, 2.0, 3.0, 5.0, 0.0]])
    assert explained_variance(values, returns, mask) == pytest.approx(0.85)
    assert math.isnan(explained_variance(values, torch.ones_like(returns), mask))


def test_reduce_takes_the_statistics_over_every_process():
    # reduce doubling every sum = two processes holding the same rows: [1, 3] twice is [1, 3, 1, 3]
    from kilter.ops.masked import masked_mean, masked_var, masked_whiten

    x = torch.tensor([[1.0, 3.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    twice = lambda t: t * 2  # noqa: E731
    assert masked_mean(x, mask, reduce=twice).item() == pytest.approx(2.0)
    assert masked_var(x, mask).item() == pytest.approx(2.0)  # n = 2: unbiased 2 / 1
    assert masked_var(x, mask, reduce=twice).item() == pytest.approx(4 / 3)  # n = 4: 4 / 3
    whitened = masked_whiten(x, mask, reduce=twice)
    assert whitened[0, :2].tolist() == pytest.approx([-(3 / 4) ** 0.5, (3 / 4) ** 0.5], rel=1e-5)
    assert whitened[0, 2].item() == 0.0
    with pytest.raises(ValueError, match="dim=None"):
        masked_mean(x, mask, dim=1, reduce=twice)
