"""Shared test set-up: tests import the project's top-level modules from the repository root."""
import os
import sys

# Tiny test shapes run fastest on one thread, and oversubscribed OpenMP threads on a shared CPU make
# them many times slower. Set before torch is imported (subprocesses started by tests inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Without CUDA, Triton kernels run through Triton's interpreter. Triton reads this once, when it is
# first imported (torchvision imports it), so it is set here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same random state, so a failure reproduces."""
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped on machines without CUDA (CI has none)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
