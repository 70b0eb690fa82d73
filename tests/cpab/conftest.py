"""cpab tests: tiny tensors, so run torch single-threaded (intra-op threads only add synchronisation
cost at these sizes and are very slow on a shared 2-core machine); the setting is restored after each test."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
