import os

import pytest

from ssmscale.threads import configure_waiting

configure_waiting()      # idle OpenMP threads sleep (threads.py): must precede the first torch import
import torch  # noqa: E402

# Tests are tiny: two threads is what CI has, and it keeps timings stable.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
