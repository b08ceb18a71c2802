"""Silence messages a ``lightning-lora`` user cannot act on; every filter names one message and where it comes from.

Real warnings stay: each filter here matches one exact message from one module, never a whole category.
"""

from __future__ import annotations

import logging
import warnings


class _DropMessages(logging.Filter):
    """Drop log records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


# (logger name, message prefixes): Lightning's advertising tips and its note that our model summary replaces its own,
# bitsandbytes' optional-kernel notice (the CPU fallback it then uses is the one we measure with).
_LOG_FILTERS = (
    ("lightning.pytorch.utilities.rank_zero", ("💡 Tip: For seamless cloud",
                                               "Trainer already configured with model summary callbacks")),
    ("bitsandbytes.backends.cpu.ops", ("Failed to load CPU gemm_4bit_forward from kernels-community",)),
)
# (message regex, category, module regex): deprecations inside libraries, not in anything the user wrote.
_WARNING_FILTERS = (
    # Lightning 2.6 calls torch's deprecated LeafSpec check (fixed upstream; nothing for a user to do).
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", Warning, r"lightning\.pytorch\.utilities\._pytree"),
    # PEFT 0.21 reads transformers' deprecated property (peft_model.py: getattr(model, "is_gradient_checkpointing")).
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils"),
)


def quiet_known_noise() -> None:
    """Install the filters above (idempotent)."""
    for name, prefixes in _LOG_FILTERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(*prefixes))
    for message, category, module in _WARNING_FILTERS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def quiet_progress_bars_when_logging() -> None:
    """No transformers download/load/save bars (``Loading weights: 0%|...``) when output is not a terminal."""
    import sys

    if not sys.stdout.isatty():
        import os

        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            from transformers.utils import logging as hf_logging
        except ImportError:  # pragma: no cover - transformers is a dependency
            return
        hf_logging.disable_progress_bar()
