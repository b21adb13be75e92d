"""Import smallbn_d2 before any test module imports Detectron2: it applies the v0.6
compatibility fixes (smallbn_d2.compat) and sets the default datasets root."""
import pytest
import torch

import smallbn_d2  # noqa: F401


@pytest.fixture
def one_thread():
    """One intra-op thread: deterministic reductions, and no oversubscription on the CI's 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
