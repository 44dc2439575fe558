"""Unit tests run the micro/tiny models on one torch thread: OpenMP barriers cost more than they save."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
