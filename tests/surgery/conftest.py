"""Settings for the surgery tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # The models here are tiny: intra-op threads only add overhead, and on a busy 2-core machine (or under
    # `pytest -n 2`) they oversubscribe the cores and make a 32-wide matmul take milliseconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
