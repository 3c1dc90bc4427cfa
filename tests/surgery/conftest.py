"""Run the model-tool tests on one intra-op thread: their tensors are tiny, and on a shared
2-core machine torch's thread pool spends more time waiting than computing."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
