"""Suite-wide test settings: deterministic CPU threads and the `cuda` marker."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# dtype="auto" / QuantConfig(compute_dtype="auto") pick bf16 on CPUs with fast bf16 matmuls: pin float32 so that test
# results do not depend on the machine (subprocess tests inherit it). Tests of the decision itself unset it.
os.environ["LIGHTNING_LORA_AUTO_DTYPE"] = "float32"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `cuda` when no CUDA device is present (CI machines have none)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _one_thread(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tiny models run faster on one intra-op thread, and it keeps them immune to CPU contention (e.g. `-n 2`).

    Tests marked `slow` (the real model) keep the default thread count.
    """
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
