"""Private names of torch and bitsandbytes that lightning-lora relies on, in one place.

An upgrade that moves one of them breaks here, loudly, and ``tests/surgery/test_compat.py`` names it; nothing else
in the package imports a private name of another library.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def global_forward_hooks() -> dict[int, Callable[..., Any]]:
    """Forward hooks registered for every module (``nn.modules.module.register_module_forward_hook``)."""
    from torch.nn.modules.module import _global_forward_hooks

    return _global_forward_hooks


def bnb_unpack_cpu_weight() -> Callable[..., Any]:
    """bitsandbytes' inverse of its AVX512-BF16 CPU repacking of a 4-bit weight: ``f(data, state) -> (data, state)``."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    return _convert_weight_packed_for_cpu_inverse
