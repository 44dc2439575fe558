import pytest
import torch

from kilter.errors import KilterError
from kilter.ops import first_true_index, truncate_after_eos


def test_first_true_index():
    flags = torch.tensor([[False, True, True], [False, False, False], [True, False, True]])
    assert first_true_index(flags).tolist() == [1, 3, 0]


def test_truncate_after_eos_by_hand():
    eos, pad = 2, 0
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    out, mask = truncate_after_eos(ids, eos, pad)
    # row 0 keeps "5 EOS", row 1 never stops (length limit), row 2 stops at once
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_truncate_after_eos_requires_distinct_pad():
    with pytest.raises(KilterError, match="pad"):
        truncate_after_eos(torch.tensor([[1, 2]]), eos_id=2, pad_id=2)
