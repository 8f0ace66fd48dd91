"""One torch thread for these small-tensor tests: on a shared 2-core box, intra-op threads only contend."""

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
