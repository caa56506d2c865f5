import os

import pytest
import torch

# Tests are tiny: two threads is what CI has, and it keeps timings stable.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
