"""Registration tests run torch on one thread: results are then bit-reproducible and CI's two cores stay free."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
