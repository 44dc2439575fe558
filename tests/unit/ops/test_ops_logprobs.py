import math

import pytest
import torch

from kilter.ops import entropy_from_logits, selective_log_softmax


def _reference(logits, labels, temperature=1.0):
    return torch.log_softmax(logits.float() / temperature, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def test_selective_log_softmax_by_hand():
    # logits (0, ln 3): softmax (1/4, 3/4)
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    labels = torch.tensor([[1, 0]])
    out = selective_log_softmax(logits, labels)
    assert torch.allclose(out, torch.tensor([[math.log(0.75), math.log(0.25)]]))
    # temperature 2: logits (0, ln 3 / 2) -> p(1) = sqrt(3) / (1 + sqrt(3))
    out_t = selective_log_softmax(logits, labels, temperature=2.0)
    assert out_t[0, 0].item() == pytest.approx(math.log(math.sqrt(3) / (1 + math.sqrt(3))), abs=1e-6)


@pytest.mark.parametrize("chunk", [1, 11 * 3, 11 * 12, 2**24])  # per-token, sub-row, multi-row, one chunk
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_log_softmax_matches_reference_and_grad(chunk, temperature):
    g = torch.Generator().manual_seed(1)
    full = torch.randn(3, 6, 11, generator=g) * 4
    labels = torch.randint(0, 11, (3, 5), generator=g)
    logits = full[:, :-1]  # a non-contiguous slice, as in the usual shift
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    ours = selective_log_softmax(a, labels, temperature=temperature, max_chunk_elements=chunk)
    ref = _reference(b, labels, temperature)
    assert ours.shape == (3, 5)
    assert torch.allclose(ours, ref, atol=1e-5)
    weights = torch.randn(3, 5, generator=g)
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-5)


def test_selective_log_softmax_gradcheck():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (2, 3), generator=g)
    assert torch.autograd.gradcheck(
        lambda z: selective_log_softmax(z, labels, temperature=1.3, max_chunk_elements=10), (logits,)
    )


def test_selective_log_softmax_bf16_upcasts_and_2d_input():
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(4, 7, 13, generator=g) * 3).bfloat16()
    labels = torch.randint(0, 13, (4, 7), generator=g)
    out = selective_log_softmax(logits, labels)
    assert out.dtype == torch.float32
    assert torch.allclose(out, _reference(logits, labels), atol=1e-5)
    flat = selective_log_softmax(logits[0], labels[0])
    assert flat.shape == (7,) and torch.allclose(flat, out[0])


def test_entropy_by_hand():
    # uniform over 4 -> ln 4; (1/4, 3/4) -> 1/4 ln 4 + 3/4 ln(4/3); a -inf logit adds nothing: ln 2
    logits = torch.tensor(
        [[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -math.inf, -math.inf], [1.0, 1.0, -math.inf, -math.inf]]]
    )
    logits.requires_grad_(True)
    h = entropy_from_logits(logits)
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()
    expected = [math.log(4), 0.25 * math.log(4) + 0.75 * math.log(4 / 3), math.log(2)]
    assert torch.allclose(h.detach(), torch.tensor([expected]), atol=1e-6)
    # temperature scales logits: (0, ln 9) at T=2 is (0, ln 3)
    h2 = entropy_from_logits(torch.tensor([[0.0, math.log(9.0)]]), temperature=2.0)
    assert h2.item() == pytest.approx(expected[1], abs=1e-6)


@pytest.mark.parametrize("chunk", [1, 7 * 2, 2**24])
def test_entropy_matches_categorical_and_grad(chunk):
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(2, 4, 7, generator=g) * 2).requires_grad_(True)
    other = logits.detach().clone().requires_grad_(True)
    ours = entropy_from_logits(logits, temperature=0.8, max_chunk_elements=chunk)
    ref = torch.distributions.Categorical(logits=other / 0.8).entropy()
    assert torch.allclose(ours, ref, atol=1e-5)
    ours.sum().backward()
    ref.sum().backward()
    assert torch.allclose(logits.grad, other.grad, atol=1e-5)


def test_entropy_gradcheck():
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: entropy_from_logits(z, 1.5, max_chunk_elements=5), (logits,))
