import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (training tests: exact, reproducible float sums)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
