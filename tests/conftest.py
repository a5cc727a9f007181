import os

import pytest
import torch


def pytest_configure(config):
    """Under pytest-xdist (the README's test command runs one worker per core), each worker gets an equal
    share of the cores for torch, instead of every worker claiming all of them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or workers) // workers))


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (training tests: exact, reproducible float sums)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
